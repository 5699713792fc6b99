"""The gateway's HTTP/1.1 server: an asyncio Protocol on httptools' parser that calls the app
directly, with no ASGI layer and no task per request.

Chosen by measurement over uvicorn (docs/gateway.md, "Choice of libraries"; docs/benchmarks.md):
uvicorn's per-request Python (scope dict, cycle object, receive/send message dicts, a task) was
about a quarter of the gateway's CPU. Here a request is a plain ``Request`` (method, path,
headers, body) and the app answers with ``(status, headers, parts)`` through a callback:

- ``app.on_head(req)`` when the request line and headers are in: an answer now (health, metadata,
  404, 401, a declared body over the limit...) or None when the app needs the body;
- ``app.on_body(req, body, reply)`` once the whole body is in (bounded by ``app.max_body_bytes``
  and ``app.body_timeout_s``): the app calls ``reply(status, headers, parts)`` exactly once, now
  or from a future's done-callback (``content-length`` is added here);
- ``app.body_failed(req, status, reply)``: the body went over the limit (413) or was too slow (408).

What it keeps of HTTP/1.1: keep-alive (idle connections closed after ``keep_alive_s``, headers must
arrive within it too), pipelined requests answered in order, one at a time (the next one is begun
when the current one's answer is written), body back-pressure (reading pauses while a pipelined
request waits), ``Expect: 100-continue``, HEAD answered without a body, a malformed request
answered 400 and the connection closed, connections past ``max_connections`` answered 503, TLS
through an ``ssl.SSLContext``, and a graceful stop (stop accepting, finish what is in flight, then
close). One timer (the sweeper) watches every connection's keep-alive and body deadlines, so a
request arms no timer of its own. A response is one socket write (head and body joined) unless
its body is large.
"""
from __future__ import annotations

import asyncio
import collections
import http
import ssl
import time
from functools import partial
from typing import Callable
from urllib.parse import unquote

import httptools
import structlog

log = structlog.get_logger("ringserve.gateway")

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_STATUS_LINES = {s: b"HTTP/1.1 %d %s\r\n" % (s, r) for s, r in _REASONS.items()}
JOIN_BELOW = 64 << 10  # bytes of body joined to the head in one write
HIGH_WATER = 1 << 20  # unread body bytes buffered for a waiting request before reading pauses
MAX_QUEUED = 8  # pipelined requests waiting behind the one in flight before reading pauses
SWEEP_S = 0.25  # how often the sweeper looks at deadlines (their resolution)
MAX_HEAD = 64 << 10  # bytes of request line and headers (the parser buffers them whole): past it, 431 and close

Reply = Callable[[int, list, list], None]


def _path(raw: bytes) -> str:
    path = raw.decode("latin-1")
    return unquote(path) if "%" in path else path


def _plain(status: int, close: bool = True) -> bytes:
    body = b'{"error":"%s"}' % _REASONS.get(status, b"error")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
            % (status, _REASONS.get(status, b""), len(body), b"connection: close\r\n" if close else b"")) + body


_BAD_REQUEST = _plain(400)
_UNAVAILABLE = _plain(503)
_HEAD_TOO_LARGE = _plain(431)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH")}
_CLOSE = b"connection: close\r\n"
_INTERNAL = (500, [(b"content-type", b"application/json")], [b'{"error":"INTERNAL: the gateway failed on this request"}'])


class Request:
    """One HTTP request as the app sees it; `ctx` is the app's own per-request state. `headers` is a
    dict of lower-case names to values (a repeated header: its last value; the body's framing is
    httptools' own decision, which refuses conflicting lengths)."""

    __slots__ = ("method", "path", "query", "headers", "ctx", "chunks", "size", "complete", "keep_alive",
                 "expect_continue", "head_only", "answer", "wants_body", "dropped", "deadline", "dispatched")

    def __init__(self, method: str, path: str, query: bytes, headers: dict, keep_alive: bool):
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.keep_alive = keep_alive
        self.ctx = None
        self.chunks: list = []
        self.size = 0
        self.complete = False
        self.expect_continue = False
        self.head_only = method == "HEAD"
        self.answer: tuple | None = None  # an answer waiting for the body's end
        self.wants_body = False
        self.dropped = False  # body bytes past a refusal are not kept
        self.deadline = 0.0
        self.dispatched = False


class HttpServer:
    """Serves `app` on pre-bound sockets; `should_exit` (set from a signal handler) starts the stop."""

    def __init__(self, app, max_connections: int = 4096, keep_alive_s: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None, drain_s: float = 600.0):
        self.app, self.max_connections, self.keep_alive_s = app, max_connections, keep_alive_s
        self.ssl_context, self.drain_s = ssl_context, drain_s
        self.connections: set[Http11Protocol] = set()
        self.started = False
        self.should_exit = False
        self.stopping = False

    async def serve(self, sockets) -> None:
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(lambda: Http11Protocol(self, loop), sock=sock, ssl=self.ssl_context,
                                            backlog=2048) for sock in sockets]
        self.started = True
        for _ in range(10 ** 12):  # bounded in count; the signal handler ends it
            if self.should_exit:
                break
            await asyncio.sleep(SWEEP_S)
            self.sweep(time.monotonic())
        self.stopping = True
        for server in servers:
            server.close()
        for conn in list(self.connections):
            conn.stop()
        end = time.monotonic() + self.drain_s
        while self.connections and time.monotonic() < end:  # the requests in flight finish
            await asyncio.sleep(0.02)
            self.sweep(time.monotonic())
        for conn in list(self.connections):
            conn.abort()

    def sweep(self, now: float) -> None:
        """Close idle connections past keep-alive; refuse bodies past their deadline (408)."""
        idle_before = now - self.keep_alive_s
        for conn in list(self.connections):
            req = conn.current
            if req is None:
                if conn.idle_since is not None and conn.idle_since < idle_before:
                    conn.close()
            elif req.wants_body and not req.complete and not req.dispatched and now >= req.deadline:
                conn.refuse_body(req, 408)


class Http11Protocol(asyncio.Protocol):
    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop):
        self.server, self.loop, self.app = server, loop, server.app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""  # the request line's target, reset once its headers are in (no on_message_begin)
        self.headers: dict = {}
        self.expect = False  # Expect: 100-continue seen in this request's headers
        self.parsing: Request | None = None  # the request whose bytes are arriving
        self.current: Request | None = None  # the request the app is answering
        self.queue: collections.deque[Request] = collections.deque()
        self.idle_since: float | None = None
        self.paused = False
        self.closing = False
        self.in_head = True  # the parser is between requests or in a request line / headers
        self.head_bytes = 0  # bytes fed while in_head (one read's worth may be missed when a request ends in it)
        self.scheme = "https" if server.ssl_context else "http"

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport) -> None:
        self.transport = transport
        if len(self.server.connections) >= self.server.max_connections or self.server.stopping:
            transport.write(_UNAVAILABLE)
            transport.close()
            self.transport = None
            return
        self.server.connections.add(self)
        self.idle_since = time.monotonic()

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # no upgrades here: answer what was asked, then close
            if self.parsing is not None:
                self.parsing.keep_alive = False
            else:
                self._refuse()
        except httptools.HttpParserError:
            self._refuse()
        if self.in_head and self.head_bytes > MAX_HEAD and not self.closing:
            self._refuse(_HEAD_TOO_LARGE)
        req = self.current
        if req is not None and req.answer is not None and not req.complete:
            self._send_answer(req)  # answered before its body ended: sent now, and the connection closes

    def _refuse(self, answer: bytes = _BAD_REQUEST) -> None:
        """Malformed bytes: 400 (or 431) and close, after the response the app is giving (if any)."""
        self.closing = True
        self.queue.clear()
        if self.current is None and self.transport is not None:
            self.transport.write(answer)
            self.transport.close()
        elif self.current is not None:
            self.current.keep_alive = False

    def stop(self) -> None:
        """Graceful stop: an idle connection closes now, a busy one after its response."""
        if self.current is None:
            self.close()
        else:
            self.closing = True
            self.queue.clear()
            self.current.keep_alive = False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ parser callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self.headers[name] = value
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect = True

    def on_headers_complete(self) -> None:
        self.in_head, self.head_bytes = False, 0
        parser, url, headers, expect = self.parser, self.url, self.headers, self.expect
        self.url, self.headers, self.expect = b"", {}, False  # for the next request on this connection
        if self.closing:
            return  # bytes after a response that closes the connection: nobody will answer them
        try:
            raw = parser.get_method()
            method = _METHODS.get(raw) or raw.decode("ascii")
            if url[:1] == b"/" and b"?" not in url and b"%" not in url and b"#" not in url:
                path, query = url.decode("latin-1"), b""  # the common case: no parse needed
            else:
                parsed = httptools.parse_url(url)
                path, query = _path(parsed.path), parsed.query or b""
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            raise httptools.HttpParserError("bad request line") from None
        req = Request(method, path, query, headers,
                      parser.should_keep_alive() and not self.server.stopping and not self.closing)
        req.expect_continue = expect
        self.parsing = req
        self.idle_since = None
        if self.current is None and not self.queue:
            self._begin(req)
        else:
            self.queue.append(req)
            if len(self.queue) >= MAX_QUEUED:
                self._pause()

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        if req is None or req.dropped:
            return
        req.size += len(body)
        if req is self.current and req.wants_body:
            if req.size > self.app.max_body_bytes:
                self.refuse_body(req, 413)
                return
        elif req.size > HIGH_WATER:
            self._pause()  # a waiting request, or one already answered: read no more for now
            if req.size > self.app.max_body_bytes:
                req.dropped, req.chunks = True, []  # its answer will be a 413 or come before its body ends
                return
        req.chunks.append(body)

    def on_message_complete(self) -> None:
        self.in_head, self.head_bytes = True, 0
        req = self.parsing
        if req is None:
            return
        req.complete = True
        self.parsing = None
        if req is self.current:
            self._advance(req)
        else:
            self._pause()  # a pipelined request waits whole: read nothing more until it is answered

    # ------------------------------------------------------------------ the app
    def _begin(self, req: Request) -> None:
        self.current = req
        try:
            req.answer = self.app.on_head(req)
        except Exception:
            log.exception("gateway_http_app_error")
            req.answer, req.keep_alive = _INTERNAL, False
        if req.answer is None:
            req.wants_body = True
            req.deadline = time.monotonic() + self.app.body_timeout_s
            if req.size > self.app.max_body_bytes or req.dropped:  # buffered while it waited
                self.refuse_body(req, 413)
                return
            if req.expect_continue and not req.complete and self.transport is not None:
                self.transport.write(_CONTINUE)
            if self.paused and self.parsing is req:
                self._resume()
        if req.complete:
            self._advance(req)

    def _advance(self, req: Request) -> None:
        """The current request's body is whole: send its answer, or hand the body to the app."""
        if req.answer is not None:
            self._send_answer(req)
        elif req.wants_body and not req.dispatched:
            req.dispatched = True
            chunks, req.chunks = req.chunks, []
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            try:
                self.app.on_body(req, body, partial(self.respond, req))  # a partial: no Python frame of its own
            except Exception:  # the app answers its own errors; this is a last resort
                log.exception("gateway_http_app_error")
                if self.current is req:
                    req.keep_alive = False
                    self._write_raw(req, _plain(500))

    def refuse_body(self, req: Request, status: int) -> None:
        """The body went over the limit (413) or past its deadline (408): answered, then closed."""
        req.dropped, req.chunks, req.dispatched, req.keep_alive = True, [], True, False
        try:
            self.app.body_failed(req, status, partial(self.respond, req))
        except Exception:  # a last resort: it must not end the sweeper (the server) nor leave req unanswered
            log.exception("gateway_http_app_error")
            if self.current is req:
                self._write_raw(req, _plain(500))

    def _send_answer(self, req: Request) -> None:
        status, headers, parts = req.answer
        req.answer = None
        self.respond(req, status, headers, parts)

    def respond(self, req: Request, status: int, headers: list, parts: list) -> None:
        """Write one response (head and body in one write unless the body is large), then go on."""
        if req is not self.current:
            return  # the connection was closed or moved on: nobody waits for this answer
        transport = self.transport
        if transport is None:
            self.current = None
            return
        length = len(parts[0]) if len(parts) == 1 else sum(map(len, parts))
        head = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"content-length: %d\r\n" % length)
        if not req.keep_alive or not req.complete:
            req.keep_alive = False  # a body left unread: the connection cannot carry another request
            head.append(_CLOSE)
        head.append(b"\r\n")
        if req.head_only:
            transport.write(b"".join(head))
        elif length <= JOIN_BELOW:
            head += parts
            transport.write(b"".join(head))
        else:
            transport.write(b"".join(head))
            for part in parts:
                transport.write(part)
        self._finish(req)

    def _write_raw(self, req: Request, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
        self._finish(req)

    def _finish(self, req: Request) -> None:
        self.current = None
        transport = self.transport
        if transport is None:
            return
        if not req.keep_alive or self.closing:
            self.closing = True  # what the parser still holds of this read is not begun
            self.queue.clear()
            transport.close()
            return
        if self.queue:  # the next pipelined request, in a later callback: no recursion through a long queue
            self.loop.call_soon(self._next)
            return
        self.idle_since = time.monotonic()
        if self.paused:
            self._resume()

    def _next(self) -> None:
        if self.current is not None or not self.queue or self.transport is None:
            return
        req = self.queue.popleft()
        if not self.queue and self.parsing is None:
            self._resume()
        self._begin(req)
        if self.current is req and req.answer is not None and not req.complete:
            self._send_answer(req)  # answered from its head, its body unread (reading may be paused): sent now, then closed
