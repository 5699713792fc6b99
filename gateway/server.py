"""Run the gateway: gateway/http11.py (httptools' parser, uvloop) serving gateway/app.py on a socket we bind.

The socket is bound here, before the server starts, so an ephemeral port (``--listen
127.0.0.1:0``) is known and announced on the ``RINGSERVE_READY`` line, and a port that is taken
is one clear line. On SIGTERM/SIGINT the server stops accepting, finishes the requests in flight,
and then the master connections are closed. The HTTP stack was chosen by measurement
(docs/gateway.md, "Choice of libraries").
"""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import ssl
from dataclasses import dataclass, field
from typing import Callable

import structlog

from ringserve.client.admin import AdminClient
from ringserve.client.aio import AsyncClient
from ringserve.gateway.accesslog import BufferedLines, access_logger
from ringserve.gateway.app import AppConfig, GatewayApp
from ringserve.gateway.auth import Tokens
from ringserve.gateway.http11 import HttpServer
from ringserve.gateway.metrics import GatewayMetrics
from ringserve.gateway.models import ModelBook
from ringserve.protocol.security import Security
from ringserve.protocol.sockets import BindError

log = structlog.get_logger("ringserve.gateway")

# Young-generation collections: CPython's default (700) is crossed by the objects of the requests in
# flight alone (64 requests hold over 1,000), so under load it collected once per ~40 requests and
# promoted live requests to older generations, whose collections then walked the whole heap
# (~45,000 objects of imported modules): 13-17 us of gateway CPU per request, measured with
# gc.callbacks under bench/gateway.py. Per-request objects die by reference counting, not by the
# collector, so a larger threshold only delays collecting real cycles, by at most this many objects.
GC_YOUNG = 10_000


@dataclass
class GatewayConfig:
    master: str = "tcp://127.0.0.1:5555"
    admin: str = "tcp://127.0.0.1:5557"
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_host: str | None = None  # None: no gRPC server
    grpc_port: int = 8001
    app: AppConfig = field(default_factory=AppConfig)
    tokens: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    status_interval: float = 1.0
    max_connections: int = 4096
    keep_alive_s: float = 30.0
    client_security: Security | None = None
    admin_security: Security | None = None


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise BindError(f"http://{host}:{port}", exc.strerror or str(exc)) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(cfg: GatewayConfig, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    host = f"[{cfg.host.strip('[]')}]" if ":" in cfg.host else cfg.host
    return f"{'https' if cfg.tls_cert else 'http'}://{host}:{port}"


async def serve_async(cfg: GatewayConfig, sock: socket.socket, announce: Callable[[dict], None],
                      metrics: GatewayMetrics, info: dict) -> None:
    tokens = Tokens(cfg.tokens) if cfg.tokens else None
    book = ModelBook(AdminClient(cfg.admin, timeout=2.0, security=cfg.admin_security), cfg.status_interval)
    sink = BufferedLines()
    access = access_logger(sink)
    app = GatewayApp(cfg.master, book, cfg.app, tokens, metrics,
                     client_factory=lambda address: AsyncClient(address, security=cfg.client_security), access=access)
    server = HttpServer(app, max_connections=cfg.max_connections, keep_alive_s=cfg.keep_alive_s,
                        ssl_context=tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop accepting, finish what is in flight, then close
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    await book.refresh()  # a first look at the cluster before the first request
    grpc_thread = start_grpc(cfg, book, metrics, access) if cfg.grpc_host else None
    if grpc_thread is not None:
        info = {**info, "grpc": f"{cfg.grpc_host}:{grpc_thread.port}"}
    book.start()
    _tune_gc()
    flusher = loop.create_task(_flush_every(sink))
    task = loop.create_task(server.serve(sockets=[sock]))
    for _ in range(1000):  # bounded: the server starts in milliseconds
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        await task  # raises what stopped it
        return
    url = url_of(cfg, sock)
    log.info("gateway_started", url=url, master=cfg.master, tls=bool(cfg.tls_cert), tokens=bool(tokens))
    announce({**info, "url": url, "pid": os.getpid()})
    try:
        await task
    finally:
        book.stop()
        flusher.cancel()
        await app.close()
        if grpc_thread is not None:
            grpc_thread.stop()
        sink.flush()
        log.info("gateway_stopped")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context (TLS 1.2+, the default ciphers) from PEM files; a bad file fails at start-up."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def _tune_gc() -> None:
    """Everything built at start-up (modules, the app) never needs collecting: freeze it out of the
    collector's walks, and collect young objects less often (GC_YOUNG)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


async def _flush_every(sink: BufferedLines) -> None:
    while True:
        await asyncio.sleep(sink.max_age_s)
        sink.flush()


def start_grpc(cfg: GatewayConfig, book: ModelBook, metrics: GatewayMetrics, access):
    """The gRPC service in its own thread (imported here: the HTTP gateway runs without it)."""
    import grpc

    from ringserve.gateway.grpc_service import GrpcThread, InferenceService

    credentials = None
    if cfg.tls_cert:
        with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
            credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
    service = InferenceService(cfg.master, book, cfg.app, Tokens(cfg.tokens) if cfg.tokens else None, metrics,
                               lambda address: AsyncClient(address, security=cfg.client_security), access)
    host = f"[{cfg.grpc_host.strip('[]')}]" if ":" in cfg.grpc_host else cfg.grpc_host
    thread = GrpcThread(service, f"{host}:{cfg.grpc_port}", cfg.app.max_body_bytes, credentials)
    try:
        thread.start()
    except (OSError, RuntimeError) as exc:
        raise BindError(f"grpc://{host}:{cfg.grpc_port}", str(exc)) from None
    log.info("grpc_started", address=f"{host}:{thread.port}")
    return thread


def serve(cfg: GatewayConfig, announce: Callable[[dict], None], metrics: GatewayMetrics | None = None,
          info: dict | None = None) -> None:
    """Bind, then serve until SIGTERM/SIGINT (raises BindError when the port is taken)."""
    sock = bind(cfg.host, cfg.port)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        runner = asyncio.run
    runner(serve_async(cfg, sock, announce, metrics or GatewayMetrics(), info or {}))
