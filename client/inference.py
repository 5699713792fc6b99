"""Client(address): many requests in flight on one DEALER socket, futures and asyncio forms.

A background I/O thread owns the socket (a socket is not thread-safe); callers hand it
requests through a deque, and write the wake-up pipe only when the deque was empty, so a
burst of requests costs one wake-up. Reliability (sending once without an ACK, resending
unanswered requests asking for one, epochs, pings, reconnects, deadlines), the socket's
set-up and its reads are the shared ``client.reliable``; ``client.aio.AsyncClient`` drives
the same rules from an asyncio loop with no thread at all, for callers that live in one.

The socket is set up in the constructor, in the caller's thread, so keys it cannot use (two client
keys and no name, no master key) or an address ZeroMQ refuses raise ``ConfigError`` there; a
``Timeout`` when the master never answered says what the socket's monitor saw (nothing listening,
a refused handshake, silence).

The I/O thread survives anything a caller does (a cancelled future, a bad reply) and `infer()`
never waits longer than its timeout plus the grace. A request id is in flight at most once per
client: reusing one that has no answer yet raises ValueError.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
import time
import uuid
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Mapping

import numpy as np
import structlog
import zmq

from ringserve.client.errors import RingserveError, Timeout
from ringserve.client.reliable import first_master, master_addresses, ClientStats, Pending, Reliability, Reply, new_pending, open_dealer
from ringserve.protocol.security import Security

log = structlog.get_logger("ringserve.client")

__all__ = ["Client", "Reply", "ClientStats"]

MAX_READ_PER_TURN = 1024  # messages read per loop turn before the outbox and timers get a turn


class Client:
    def __init__(self, address: str, timeout: float = 30.0, retry_interval: float = 0.5,
                 max_retry_interval: float = 4.0, ping_interval: float = 0.5, grace: float = 1.0,
                 hwm: int = 100_000, security: Security | None = None, failover_after: float = 0.6,
                 batch_max: int = 256, batch_bytes: int = 4 << 20):
        endpoints = master_addresses(address)  # one master, or several (active-active): ConfigError if none
        current = first_master(endpoints)
        self.address, self.timeout = address, timeout
        self.retry_interval, self.max_retry_interval = retry_interval, max_retry_interval
        self.ping_interval, self.grace, self.hwm = ping_interval, grace, hwm
        self.security = security or Security()  # Security(keys_dir, "client", name) for a CURVE master
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._outbox: collections.deque[Pending] = collections.deque()
        self._outbox_lock = threading.Lock()
        self._rel = Reliability(retry_interval, max_retry_interval, ping_interval, self._forget_id,
                                address=address, endpoints=endpoints, current=current,
                                failover_after=failover_after, batch_max=batch_max, batch_bytes=batch_bytes, curve=self.security.enabled)
        self._pending = self._rel.pending
        self.stats: ClientStats = self._rel.stats
        self._ids_lock = threading.Lock()
        self._live_ids: set[str] = set()  # ids handed to infer_async and not yet answered
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._closing = False
        self._ctx = zmq.Context()
        try:  # here, so that unusable keys or a bad address raise ConfigError to the caller
            self._sock, self._monitor = open_dealer(self._ctx, endpoints[current], hwm, self.security)
        except BaseException:
            self._ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise
        # The I/O thread owns the sockets from here on (Thread.start is the memory barrier a hand-over needs).
        self._thread = threading.Thread(target=self._loop, name="ringserve-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API
    @property
    def master(self) -> str:
        """The master this client is on now (with several, the one it last failed over to)."""
        return self._rel.address

    def infer(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
              version: int | None = None, tags: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """Run `model` on named inputs (numpy arrays or torch tensors); return numpy outputs.

        Waits at most `timeout` plus the client's grace, whatever happens to the I/O thread.
        `tags` (small str -> str map) travel with the request, e.g. the user id a sticky route keys on.
        """
        timeout = self.timeout if timeout is None else timeout
        fut = self.infer_async(model, inputs, timeout, version, tags=tags)
        try:
            return fut.result(timeout=timeout + self.grace).outputs
        except FutureTimeout:
            fut.cancel()
            raise Timeout(self._rel.timeout_message(), getattr(fut, "request_id", None)) from None

    def infer_async(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
                    version: int | None = None, request_id: str | None = None,
                    tags: Mapping[str, str] | None = None) -> Future:
        """Send now; the Future resolves to a Reply or raises a RingserveError subclass."""
        if self._closing:
            raise RuntimeError("client is closed")
        if not self._thread.is_alive():
            raise RuntimeError("the client's I/O thread has stopped; make a new Client")
        timeout = self.timeout if timeout is None else timeout
        rid = request_id or f"{self._prefix}-{next(self._ids)}"
        fut: Future = Future()
        fut.request_id = rid  # type: ignore[attr-defined]  # for callers correlating their own logs
        p = new_pending(rid, model, inputs, timeout, self.grace, self.retry_interval, version, tags, fut)
        with self._ids_lock:
            if rid in self._live_ids:
                raise ValueError(f"request id {rid!r} is already in flight on this client; use a new id")
            self._live_ids.add(rid)
        with self._outbox_lock:
            wake = not self._outbox  # the I/O thread takes the whole deque at once: one wake-up per burst
            self._outbox.append(p)
        if wake:
            os.write(self._wake_w, b"x")
        return fut

    async def ainfer(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
                     version: int | None = None, tags: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        reply = await asyncio.wrap_future(self.infer_async(model, inputs, timeout, version, tags=tags))
        return reply.outputs

    @property
    def epoch(self) -> str | None:
        """The master's epoch as last seen (changes when the master restarts)."""
        return self._rel.epoch

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- I/O loop
    def _loop(self) -> None:
        sock, monitor = self._sock, self._monitor
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._closing:
                try:
                    self._turn(sock, monitor, poller)
                except Exception:  # nothing a caller or a peer does may end this thread
                    self.stats.loop_errors += 1
                    log.exception("client_loop_error")
        finally:
            self._rel.fail_all("client closed before an answer arrived")
            with self._outbox_lock:
                left = list(self._outbox)
                self._outbox.clear()
            for p in left:
                self._rel.resolve(p, exc=RingserveError("client closed before the request was sent", p.rid))
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _turn(self, sock: zmq.Socket, monitor: zmq.Socket, poller: zmq.Poller) -> None:
        """One loop turn: take new requests, read the monitor and the socket, run the timers."""
        events = dict(poller.poll(50))
        if self._wake_r in events:
            try:
                os.read(self._wake_r, 65536)
            except BlockingIOError:
                pass
        with self._outbox_lock:
            batch = list(self._outbox)
            self._outbox.clear()
        for p in batch:
            self._rel.start(sock, p)
        if monitor in events:
            self._rel.read_monitor(sock, monitor)
        if sock in events:
            self._rel.read_messages(sock, MAX_READ_PER_TURN)
        self._rel.on_timers(sock, time.monotonic())
        self._rel.flush(sock)  # everything this turn sent (new requests, resends): one message

    def _forget_id(self, rid: str) -> None:
        with self._ids_lock:
            self._live_ids.discard(rid)
