"""Socket helpers every role's event loop shares (the loops themselves stay in their roles)."""
from __future__ import annotations

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
