"""The HTTP server layer alone: a trivial echo app under each candidate server, driven by the load
of bench/gateway.py (raw HTTP/1.1 keep-alive, the binary OIP request, 64 in flight); prints one JSON
line per round with each server's CPU per request (its whole process tree, from /proc).

Candidates: uvicorn (httptools, uvloop) with an ASGI echo; granian (Rust) with an RSGI echo and
with the same ASGI echo; an asyncio Protocol on httptools' parser under uvloop (no ASGI layer), a
task per request as a real handler needs. Rounds interleave the candidates, so read the ratios
within a round. uvicorn and granian are measured only where installed (`pip install uvicorn
granian`; the gateway depends on neither since it serves with gateway/http11.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench.gateway as bench_gateway  # noqa: E402
from bench.gateway import _http_proc, drive  # noqa: E402
from bench.loadgen import proc_cpu_s  # noqa: E402

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------ the apps (run in the server process)
async def asgi_echo(scope, receive, send):
    if scope["type"] != "http":
        return
    parts, more = [], True
    while more:
        msg = await receive()
        parts.append(msg.get("body", b""))
        more = msg.get("more_body", False)
    body = b"".join(parts)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def rsgi_echo(scope, proto):
    body = await proto()
    proto.response_bytes(200, [("content-type", "application/octet-stream")], body)


def serve_httptools(port: int) -> None:
    import httptools
    import uvloop

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.t, self.parser, self.body = transport, httptools.HttpRequestParser(self), []
            self.loop = asyncio.get_running_loop()

        def data_received(self, data):
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.t.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.t.close()

        def on_message_begin(self):
            self.body = []

        def on_body(self, b):
            self.body.append(b)

        def on_message_complete(self):
            self.loop.create_task(self.handle(b"".join(self.body)))

        async def handle(self, body):
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)

    async def main():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(Echo, "127.0.0.1", port, backlog=2048)
        await srv.serve_forever()

    uvloop.run(main())


def serve_uvicorn(port: int) -> None:
    import uvicorn

    uvicorn.run(asgi_echo, host="127.0.0.1", port=port, http="httptools", loop="uvloop",
                lifespan="off", access_log=False, log_level="warning", server_header=False, date_header=False)


# ------------------------------------------------------------------ the driver
def tree_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and its children (granian runs its worker as a child process)."""
    total = proc_cpu_s(pid)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                if ppid == pid:
                    total += tree_cpu_s(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return total


def apps_dir() -> Path:
    """granian imports the app by module path and walks up through packages; this repo's root is
    one, so the two echo apps are written to a folder of their own."""
    import inspect
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="rs-echo-"))
    (d / "rs_echo_apps.py").write_text(inspect.getsource(asgi_echo) + "\n\n" + inspect.getsource(rsgi_echo))
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, port: int) -> subprocess.Popen:
    py, cwd = sys.executable, None
    if kind.startswith("granian"):
        iface, target = ("rsgi", "rsgi_echo") if kind == "granian-rsgi" else ("asgi", "asgi_echo")
        cmd = [str(Path(py).parent / "granian"), "--interface", iface, "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--loop", "uvloop", "--no-ws", "--log-level", "warning",
               f"rs_echo_apps:{target}"]
        cwd = apps_dir()
    else:
        cmd = [py, str(HERE), "--serve", kind, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=cwd)
    for _ in range(300):  # bounded: 30 s
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def measure(kind: str, seconds: float, concurrency: int, processes: int) -> dict:
    port = free_port()
    proc = start(kind, port)
    try:
        time.sleep(0.5)
        f = drive(_http_proc, (port, "binary"), concurrency, processes, seconds, proc.pid)
        return {"req_per_s": f["req_per_s"], "p99_ms": f["p99_ms"], "errors": f["errors"],
                "server_cpu_us": f["gateway_cpu_us"]}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--load-processes", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--servers", default="uvicorn,granian-rsgi,granian-asgi,httptools")
    args = p.parse_args(argv)
    if args.serve:
        {"uvicorn": serve_uvicorn, "httptools": serve_httptools}[args.serve](args.port)
        return
    bench_gateway.proc_cpu_s = tree_cpu_s  # drive() reads one pid; granian serves from a child process
    import importlib.util
    kinds = [k for k in args.servers.split(",")
             if importlib.util.find_spec(k.split("-")[0]) is not None or k == "httptools"]
    if len(kinds) < len(args.servers.split(",")):
        print("uvicorn or granian is not installed (not ringserve dependencies): pip install them to measure them",
              file=sys.stderr)
    for r in range(args.rounds):
        kinds = kinds if r % 2 == 0 else kinds[::-1]
        print(json.dumps({"round": r, **{k: measure(k, args.seconds, args.concurrency, args.load_processes)
                                         for k in kinds}}), flush=True)


if __name__ == "__main__":
    main()
