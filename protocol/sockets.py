"""Socket helpers every role's event loop shares (the loops themselves stay in their roles)."""
from __future__ import annotations

import errno
from typing import Callable

import structlog
import zmq

log = structlog.get_logger("ringserve.sockets")


def drain(sock: zmq.Socket, handler: Callable[[list], None], limit: int) -> None:
    """Handle up to `limit` waiting messages without blocking, so no socket starves the others.

    A handler that raises is logged and the loop goes on: one bad message never stops a process.
    """
    for _ in range(limit):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        try:
            handler(frames)
        except Exception:
            log.exception("handler_failed", handler=getattr(handler, "__name__", "?"))


class BindError(RuntimeError):
    """A socket could not bind its endpoint (a port in use, a bad address): says which."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f"cannot bind {endpoint}: {reason}")
        self.endpoint, self.reason = endpoint, reason


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind and return the endpoint actually bound (ephemeral ports resolved); BindError if not."""
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise BindError(endpoint, "address already in use" if exc.errno == errno.EADDRINUSE else str(exc)) from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)
