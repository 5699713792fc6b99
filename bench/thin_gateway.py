"""Candidate HTTP layers for the gateway, for measurement only, in uvicorn's place in
gateway/server.py (nothing else changes). Run as `python -m ringserve.bench.thin_gateway ARGS`
with the gateway's own arguments; RS_HTTP_CANDIDATE picks the candidate:

- ``thin``: the ThinProtocol below, an asyncio Protocol on httptools' parser calling the same
  GatewayApp through a minimal ASGI shim (no uvicorn cycle object, flow control or per-message
  checks); no TLS, no limits, no pipelining: the floor of what such a server costs;
- ``http11``: bench/http11.py, the same idea with what the gateway would need to deploy it.

bench/gateway.py --http-server thin|http11 starts it.
"""
from __future__ import annotations

import asyncio
import http

import httptools

from ringserve.gateway import server as gw_server

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_BAD = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class ThinProtocol(asyncio.Protocol):
    def __init__(self, app, loop):
        self.app, self.loop = app, loop
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list = []
        self.chunks: list = []
        self.complete = False
        self.waiter: asyncio.Future | None = None
        self.task: asyncio.Task | None = None
        self.keep_alive = True

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(_BAD)
            self.transport.close()

    # parser callbacks
    def on_message_begin(self):
        self.url, self.headers, self.chunks, self.complete = b"", [], [], False

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name.lower(), value))

    def on_headers_complete(self):
        self.transport.pause_reading()  # one request at a time per connection
        self.keep_alive = self.parser.should_keep_alive()
        parsed = httptools.parse_url(self.url)
        scope = {"type": "http", "method": self.parser.get_method().decode(), "path": parsed.path.decode(),
                 "query_string": parsed.query or b"", "headers": self.headers}
        self.task = self.loop.create_task(self.app(scope, self.receive, self.send))
        self.transport.resume_reading()  # the body may follow

    def on_body(self, body):
        self.chunks.append(body)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def on_message_complete(self):
        self.complete = True
        self.transport.pause_reading()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # the ASGI side
    async def receive(self):
        while not self.chunks and not self.complete:
            if self.transport is None:
                return {"type": "http.disconnect"}
            self.waiter = self.loop.create_future()
            await self.waiter
        body = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks = []
        return {"type": "http.request", "body": body, "more_body": not self.complete}

    async def send(self, msg):
        t = self.transport
        if t is None:
            return
        if msg["type"] == "http.response.start":
            status = msg["status"]
            head = [b"HTTP/1.1 ", str(status).encode(), b" ", _REASONS.get(status, b""), b"\r\n"]
            for k, v in msg["headers"]:
                head += (k, b": ", v, b"\r\n")
            if not self.keep_alive:
                head.append(b"connection: close\r\n")
            head.append(b"\r\n")
            self.head = b"".join(head)
            return
        body = msg.get("body", b"")
        if self.head is not None:
            t.write(self.head + body if len(body) < 65536 else self.head)
            if len(body) >= 65536:
                t.write(body)
            self.head = None
        elif body:
            t.write(body)
        if not msg.get("more_body", False):
            if self.keep_alive and self.complete:
                t.resume_reading()
            else:
                t.close()

    head = None


class ThinConfig:
    def __init__(self, app, **_):
        self.app = app


class ThinServer:
    def __init__(self, config: ThinConfig):
        self.app, self.started, self.should_exit = config.app, False, False

    async def serve(self, sockets):
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: ThinProtocol(self.app, loop), sock=sockets[0], backlog=2048)
        self.started = True
        for _ in range(10 ** 9):
            if self.should_exit:
                break
            await asyncio.sleep(0.1)
        srv.close()


def _http11(config: ThinConfig):
    from ringserve.bench.http11 import HttpServer
    return HttpServer(config.app)


def main() -> None:
    import os
    gw_server._Server = _http11 if os.environ.get("RS_HTTP_CANDIDATE") == "http11" else ThinServer
    gw_server.uvicorn.Config = ThinConfig  # serve_async builds uvicorn.Config(app, ...)
    from ringserve.launch.gateway import main as gateway_main
    gateway_main()


if __name__ == "__main__":
    main()
