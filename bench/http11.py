"""A candidate HTTP/1.1 server for the gateway, measured and not adopted: an asyncio Protocol on
httptools' parser calling the gateway's ASGI app (bench/gateway.py --http-server http11).

It did not cut the gateway's CPU per request by the 20 % that would justify replacing uvicorn
(docs/benchmarks.md, "The HTTP layer"), so the gateway stays on uvicorn; this is kept so the
measurement can be repeated (put in uvicorn's place in gateway/server.py by hand, it passed
tests/test_gateway*.py and tests/test_graceful_stop.py). It covers what the gateway needs of HTTP/1.1: keep-alive (idle connections closed after
``keep_alive_s``, headers must arrive within it too), pipelined requests answered in order one at a
time, Content-Length and chunked bodies streamed to the app with back-pressure, ``Expect:
100-continue``, HEAD answered without a body, a malformed request answered 400 and the connection
closed, connections past ``max_connections`` answered 503, TLS through an ``ssl.SSLContext``, and
a graceful stop that stops accepting and lets the requests in flight finish. The body size and
time limits are the app's (gateway/app.py). A response is one socket write (head and body joined)
unless its body is large.
"""
from __future__ import annotations

import asyncio
import collections
import http
import ssl
import time
from urllib.parse import unquote

import httptools
import structlog

log = structlog.get_logger("ringserve.gateway")

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
JOIN_BELOW = 64 << 10  # bytes of body joined to the head in one write
HIGH_WATER = 1 << 20  # unread body bytes buffered per connection before reading pauses
MAX_QUEUED = 8  # pipelined requests waiting behind the one in flight before reading pauses


def _path(raw: bytes) -> str:
    path = raw.decode("latin-1")
    return unquote(path) if "%" in path else path  # as uvicorn gives it to ASGI apps


def _plain(status: int, close: bool = True) -> bytes:
    body = b'{"error":"%s"}' % _REASONS.get(status, b"error")
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
            % (status, _REASONS.get(status, b""), len(body), b"connection: close\r\n" if close else b"")) + body


_BAD_REQUEST = _plain(400)
_UNAVAILABLE = _plain(503)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Request:
    __slots__ = ("scope", "chunks", "buffered", "complete", "keep_alive", "expect_continue", "head_only")

    def __init__(self, scope: dict, keep_alive: bool, expect_continue: bool):
        self.scope, self.keep_alive, self.expect_continue = scope, keep_alive, expect_continue
        self.chunks: list = []
        self.buffered = 0
        self.complete = False
        self.head_only = scope["method"] == "HEAD"


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
            await asyncio.sleep(0.1)
        self.stopping = True
        for server in servers:
            server.close()
        for conn in list(self.connections):
            conn.stop()
        end = time.monotonic() + self.drain_s
        while self.connections and time.monotonic() < end:  # the requests in flight finish
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()


class Http11Protocol(asyncio.Protocol):
    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop):
        self.server, self.loop, self.app = server, loop, server.app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list = []
        self.parsing: _Request | None = None  # the request whose bytes are arriving
        self.current: _Request | None = None  # the request the app is answering
        self.queue: collections.deque[_Request] = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.head: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.closing = False

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport) -> None:
        self.transport = transport
        if len(self.server.connections) >= self.server.max_connections or self.server.stopping:
            transport.write(_UNAVAILABLE)
            transport.close()
            self.transport = None
            return
        self.server.connections.add(self)
        self._arm_timer()

    def connection_lost(self, exc) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self._cancel_timer()
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # no upgrades here: answer what was asked, then close
            if self.parsing is not None:
                self.parsing.keep_alive = False
            else:
                self._refuse()
        except httptools.HttpParserError:
            self._refuse()

    def _refuse(self) -> None:
        """Malformed bytes: 400 and close, after the response the app is giving (if any)."""
        self.closing = True
        self.queue.clear()
        if self.current is None and self.transport is not None:
            self.transport.write(_BAD_REQUEST)
            self.transport.close()
        elif self.current is not None:
            self.current.keep_alive = False

    def stop(self) -> None:
        """Graceful stop: an idle connection closes now, a busy one after its response."""
        if self.current is None and self.transport is not None:
            self.transport.close()
        else:
            self.closing = True
            self.queue.clear()
            if self.current is not None:
                self.current.keep_alive = False

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _arm_timer(self) -> None:
        self._cancel_timer()
        self.timer = self.loop.call_later(self.server.keep_alive_s, self._idle)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _idle(self) -> None:
        self.timer = None
        if self.current is None and self.transport is not None:
            self.transport.close()

    def _pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        self.url, self.headers = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._cancel_timer()
        parser = self.parser
        try:
            parsed = httptools.parse_url(self.url)
            method = parser.get_method().decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            raise httptools.HttpParserError("bad request line") from None
        scope = {"type": "http", "http_version": parser.get_http_version(), "method": method,
                 "path": _path(parsed.path), "raw_path": parsed.path, "query_string": parsed.query or b"",
                 "headers": self.headers, "scheme": "https" if self.server.ssl_context else "http"}
        expect = any(k == b"expect" and v.lower() == b"100-continue" for k, v in self.headers)
        req = _Request(scope, parser.should_keep_alive() and not self.server.stopping, expect)
        self.parsing = req
        if self.current is None:
            self._start(req)
        else:
            self.queue.append(req)
            if len(self.queue) >= MAX_QUEUED:
                self._pause()

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        req.chunks.append(body)
        req.buffered += len(body)
        if req.buffered > HIGH_WATER:
            self._pause()
        if req is self.current:
            self._wake()

    def on_message_complete(self) -> None:
        req = self.parsing
        req.complete = True
        self.parsing = None
        if req is self.current:
            self._wake()
        elif req is not None:
            self._pause()  # a pipelined request waits whole: read nothing more until it is answered

    # ------------------------------------------------------------------ the app
    def _start(self, req: _Request) -> None:
        self.current, self.head = req, None
        self.loop.create_task(self._run(req))

    async def _run(self, req: _Request) -> None:
        try:
            await self.app(req.scope, self._receive, self._send)
        except Exception:  # the app answers its own errors; this is a last resort
            log.exception("gateway_http_app_error")
        if self.current is req:  # the app did not finish a response
            if self.transport is not None:
                if self.head is None:
                    self.transport.write(_plain(500))
                self.transport.close()
            self.current = None

    async def _receive(self) -> dict:
        req = self.current
        if req.expect_continue and not req.chunks and not req.complete and self.transport is not None:
            req.expect_continue = False
            self.transport.write(_CONTINUE)
        while not req.chunks and not req.complete:
            if self.transport is None:
                return {"type": "http.disconnect"}
            if self.paused and self.parsing is req:
                self._resume()
            self.waiter = self.loop.create_future()
            await self.waiter
        if self.transport is None and not req.complete:
            return {"type": "http.disconnect"}
        chunks, req.chunks, req.buffered = req.chunks, [], 0
        if self.paused and self.parsing is req:
            self._resume()
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return {"type": "http.request", "body": body, "more_body": not req.complete}

    async def _send(self, msg: dict) -> None:
        transport, req = self.transport, self.current
        if req is None:
            return
        if msg["type"] == "http.response.start":
            status = msg["status"]
            head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
            for name, value in msg.get("headers", ()):
                head += (name, b": ", value, b"\r\n")
            if not req.keep_alive or not req.complete:
                req.keep_alive = False  # a body left unread: the connection cannot carry another request
                head.append(b"connection: close\r\n")
            head.append(b"\r\n")
            self.head = b"".join(head)
            return
        if transport is None:
            return
        body = b"" if req.head_only else msg.get("body", b"")
        more = msg.get("more_body", False)
        if self.head is not None:
            if len(body) <= JOIN_BELOW:
                transport.write(self.head + body)
            else:
                transport.write(self.head)
                transport.write(body)
            self.head = b""
        elif body:
            transport.write(body)
        if not more:
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        self.current = None
        transport = self.transport
        if transport is None:
            return
        if not req.keep_alive or self.closing:
            transport.close()
            return
        if self.queue:
            self._start(self.queue.popleft())
            if not self.queue and self.parsing is None:
                self._resume()
            return
        self._resume()
        self._arm_timer()
