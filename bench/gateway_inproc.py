"""The gateway's own CPU per request in process: its HTTP server and app, with the master's answer
faked, no sockets and no other process; prints one JSON line.

One connection's protocol is fed the binary OIP request of bench/gateway.py (1x256 FP32, binary
output) through a fake transport, the AsyncClient is replaced by one whose future resolves on the
next loop turn with a 1x10 FP32 output, and the access log writes to /dev/null: what is left is
the HTTP layer, the app, the access line and the metrics. CPU time (`time.thread_time`) over
`--requests` requests, `--rounds` times, less the same loop turns without a request; the median
round is printed with the range. It runs
against whichever gateway code `ringserve` imports: this checkout's (gateway/http11.py, the app
called directly), or an older one through PYTHONPATH (then uvicorn's protocol and the ASGI app,
if that code has gateway/transport.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway import http_bodies  # noqa: E402
from ringserve.client.reliable import Reply  # noqa: E402
from ringserve.gateway.accesslog import AccessLog, BufferedLines  # noqa: E402
from ringserve.gateway.app import AppConfig, GatewayApp  # noqa: E402
from ringserve.gateway.metrics import GatewayMetrics  # noqa: E402
from ringserve.gateway.models import ModelBook, ModelView  # noqa: E402


class FakeClient:
    """AsyncClient's submit, answered on the next loop turn (as a batched reply would be, later),
    in the form the real client hands over: the checked tensor list (a 1x10 FP32 output inline, as
    the worker sends a tensor that small) with no arrays made yet (client/reply.py)."""

    def __init__(self, loop):
        self.loop = loop
        self.meta = [["logits", "float32", [1, 10], np.zeros((1, 10), np.float32).tobytes()]]

    def submit(self, model, inputs, timeout=None, version=None, request_id=None, tags=None):
        fut = self.loop.create_future()
        self.loop.call_soon(fut.set_result, Reply(request_id, None, 1, "w", {}, self.meta, ()))
        return fut

    def close(self):
        pass


class FakeTransport:
    def __init__(self):
        self.writes = 0
        self.closed = False

    def write(self, data):
        self.writes += 1

    def writelines(self, lines):
        for data in lines:
            self.write(data)

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)


def build(loop):
    book = ModelBook(None)
    book.models["mlp"] = ModelView(versions={1}, ready_versions={1})
    book.ready_workers, book.last_ok = 1, time.monotonic() + 1e9
    access = AccessLog(BufferedLines(open(os.devnull, "w")), {"role": "gateway"})
    return GatewayApp("tcp://127.0.0.1:1", book, AppConfig(), None, GatewayMetrics(),
                      client_factory=lambda address: FakeClient(loop), access=access)


def protocol_of(app, loop):
    """(protocol, which server): gateway/http11.py when present, else uvicorn's as the old gateway ran it."""
    transport = FakeTransport()
    try:
        from ringserve.gateway.http11 import Http11Protocol, HttpServer
        proto = Http11Protocol(HttpServer(app), loop)
        kind = "http11"
    except ImportError:
        import uvicorn
        from uvicorn.server import ServerState

        from ringserve.gateway.transport import CoalescingHttpToolsProtocol
        config = uvicorn.Config(app, http=CoalescingHttpToolsProtocol, lifespan="off", access_log=False,
                                log_config=None, server_header=False, date_header=False, proxy_headers=False)
        config.load()
        proto = CoalescingHttpToolsProtocol(config, ServerState(), app_state={}, _loop=loop)
        kind = "uvicorn"
    proto.connection_made(transport)
    return proto, transport, kind


async def run(requests: int, rounds: int) -> dict:
    loop = asyncio.get_running_loop()
    app = build(loop)
    proto, transport, kind = protocol_of(app, loop)
    x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    extra, body = http_bodies(x)["binary"]
    req = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: bench\r\n" + extra + b"Content-Length: "
           + str(len(body)).encode() + b"\r\n\r\n" + body)
    per: list[float] = []
    idle: list[float] = []
    for r in range(rounds + 1):  # the first round warms up
        t0 = time.thread_time()
        for _ in range(requests):  # the loop turns alone, taken off below
            for _ in range(4):
                await asyncio.sleep(0)
        if r:
            idle.append((time.thread_time() - t0) / requests * 1e6)
        writes0 = transport.writes
        t0 = time.thread_time()
        for _ in range(requests):
            proto.data_received(req)
            for _ in range(4):  # the client's future, its done-callback, the write (and uvicorn's task)
                await asyncio.sleep(0)
        took = time.thread_time() - t0
        if transport.writes - writes0 < requests or transport.closed:
            raise RuntimeError(f"{transport.writes - writes0} responses written for {requests} requests")
        if r:
            per.append(took / requests * 1e6 - idle[-1])
    return {"server": kind, "requests": requests, "rounds": rounds,
            "us_per_req_median": round(statistics.median(per), 1),
            "us_per_req_range": [round(min(per), 1), round(max(per), 1)],
            "loop_turns_us_taken_off": round(statistics.median(idle), 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    import uvloop
    print(json.dumps(uvloop.run(run(args.requests, args.rounds))))


if __name__ == "__main__":
    main()
