"""The access log: one JSON line per request, the same fields as every structlog event, written in batches.

A write (and flush) per request cost the gateway more CPU than the rest of a small request's
work, and so did structlog's processor chain (context merge, level, ISO time stamp, renderer:
about as much as the whole binary request path). So `AccessLog` renders the line itself with
orjson, with the fields the role's processors add (its bound context such as ``role``, ``level``,
``timestamp`` in ISO 8601 UTC), and honours ``--log-level`` as structlog would. The HTTP line
(``http_request``) goes further: what only the route decides is rendered once per route and the
request's own fields are put between (the same bytes, tests/test_gateway_accesslog.py). Lines are kept
in memory (orjson's bytes appended to one ``bytearray``: decoded once per batch, not per line) and
written together when 64 kB are waiting, on the gateway's periodic flush every `max_age_s` (so no
line waits longer than that; a clock read per line cost more than the rest of keeping it) and at
shutdown. Bounded: a write failure drops the batch rather than growing it. Why one buffer and not
a list of lines: each orjson line kept alive until the flush cost ~2.5 us more to allocate and
free than the rendering itself (glibc's malloc, lines of a few hundred bytes that orjson sizes
down from a larger buffer); appended to the buffer, each line's bytes are freed at once and the
allocator reuses the same block for the next.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import datetime, timezone
from typing import TextIO

import orjson
import structlog

MAX_BYTES = 64 << 10
MAX_ROUTES = 1024  # AccessLog.http_request's rendered route parts kept
_HTTP_FIELDS = {"method", "path", "status", "ms", "request_id", "id", "tenant", "model", "event", "level", "timestamp"}


class BufferedLines:
    """A structlog logger whose lines (str or UTF-8 bytes) wait in memory; safe to call from several threads."""

    def __init__(self, file: TextIO | None = None, max_age_s: float = 0.2):
        self._file = file or sys.stderr
        self.max_age_s = max_age_s  # how often the owner calls flush()
        self._buf = bytearray()  # the lines waiting, each ended by a newline
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Bytes waiting for the next flush."""
        return len(self._buf)

    def msg(self, message: str | bytes) -> None:
        line = message if type(message) is bytes else message.encode("utf-8", "replace")
        with self._lock:
            buf = self._buf
            buf += line
            buf += b"\n"
            due = len(buf) >= MAX_BYTES
        if due:
            self.flush()

    info = debug = warning = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:
            buf, self._buf = self._buf, bytearray()
        if not buf:
            return
        try:
            self._file.write(buf.decode("utf-8", "replace"))
            self._file.flush()
        except (OSError, ValueError):  # a closed or full stderr: the lines are lost, serving is not
            pass


class AccessLog:
    """``.info(event, **fields)`` as a structlog logger would render it, at a fraction of the cost."""

    def __init__(self, sink: BufferedLines, context: dict | None = None, enabled: bool = True):
        self._sink, self._context, self.enabled = sink, dict(context or {}), enabled
        self._second = -1
        self._prefix = ""
        self._prefix_bytes = b""
        self._routes: dict[tuple, tuple[bytes, bytes]] = {}  # http_request's rendered parts per route

    def _timestamp(self) -> str:
        """ISO 8601 UTC with microseconds, as structlog's TimeStamper(fmt="iso", utc=True) writes it."""
        now = time.time()
        second = int(now)
        if second != self._second:  # the date and time of day change once a second
            self._second = second
            self._prefix = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            self._prefix_bytes = self._prefix.encode()
        return "%s.%06dZ" % (self._prefix, (now - second) * 1e6)

    def info(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        if self._context:
            fields.update(self._context)
        fields["event"] = event
        fields["level"] = "info"
        fields["timestamp"] = self._timestamp()
        self._sink.msg(orjson.dumps(fields, default=str))

    def http_request(self, method: str, path: str, status: int, ms: float, request_id: str, id: str | None,
                     tenant: str | None, model: str | None) -> None:
        """``info("http_request", method=..., ..., model=...)``, byte for byte, for the gateway's
        line per request: what only the route decides (method, path, tenant, model, the bound
        context) is rendered once per route and kept (bounded), and the rest is put between.
        `request_id` is the gateway's own (letters, digits and '-': nothing to escape)."""
        if not self.enabled:
            return
        key = (method, path, tenant, model)
        parts = self._routes.get(key)
        if parts is None:
            if self._context.keys() & _HTTP_FIELDS:  # a bound key that would take a field's place: the long way
                self.info("http_request", method=method, path=path, status=status, ms=ms, request_id=request_id,
                          id=id, tenant=tenant, model=model)
                return
            if len(self._routes) >= MAX_ROUTES:
                self._routes.clear()
            head = orjson.dumps({"method": method, "path": path}, default=str)[:-1] + b',"status":'
            tail = orjson.dumps({"tenant": tenant, "model": model, **self._context, "event": "http_request",
                                 "level": "info", "timestamp": ""}, default=str)[1:-2]
            parts = self._routes[key] = (head, b',' + tail)
        now = time.time()
        second = int(now)
        if second != self._second:
            self._timestamp()
        self._sink.msg(b'%s%d,"ms":%s,"request_id":"%s","id":%s%s%s.%06dZ"}' % (
            parts[0], status, orjson.dumps(ms), request_id.encode(), b"null" if id is None else orjson.dumps(id),
            parts[1], self._prefix_bytes, (now - second) * 1e6))


def access_logger(sink: BufferedLines) -> AccessLog:
    """An AccessLog on `sink` with the role's bound context, enabled when structlog logs at info."""
    wrapper = structlog.get_config()["wrapper_class"]
    is_enabled = getattr(wrapper, "is_enabled_for", None)
    enabled = True if is_enabled is None else bool(is_enabled(None, logging.INFO))
    return AccessLog(sink, structlog.contextvars.get_contextvars(), enabled)
