"""One write per response: uvicorn writes a response's head and its body separately, and on a
busy host each write to a socket costs more CPU (and wakes the client more often) than all of the
gateway's own work for a small request. Writes made in one event-loop turn are coalesced and
handed to the transport together at the end of that turn (nothing waits longer than the turn).
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

JOIN_MAX = 64 << 10  # bytes: smaller writes of one turn are joined into one


class CoalescingTransport:
    """A transport whose writes wait for the end of the loop turn; everything else passes through."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self._pending: list = []

    def write(self, data) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending or self._transport.is_closing():
            return
        if len(pending) == 1:
            self._transport.write(pending[0])
        elif sum(len(p) for p in pending) <= JOIN_MAX:
            self._transport.write(b"".join(pending))
        else:  # large tensors: no copy to join them, the transport queues each buffer
            for data in pending:
                self._transport.write(data)

    def close(self) -> None:
        self._flush()  # what was written goes out before the close
        self._transport.close()

    def is_closing(self) -> bool:  # uvicorn asks after every response: no __getattr__ for it
        return self._transport.is_closing()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = CoalescingTransport(transport, self.loop)
