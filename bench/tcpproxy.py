"""A small TCP proxy that misbehaves on request: the faults this kernel's missing netem would give.

    python -m bench.tcpproxy --listen HOST:PORT --target HOST:PORT --mode-file FILE

It forwards every connection to the target and reads FILE (polled every 50 ms) for what to do:

    pass        forward as fast as it can
    delay MS    hold every chunk MS milliseconds in each direction (order kept)
    stall       stop forwarding (chunks wait, bounded; reading stops, so TCP pushes back)
    reset       reset every open connection (SO_LINGER 0: the peers get RST) and each new one

Announces ``RINGSERVE_READY {"endpoint": "tcp://HOST:PORT"}`` once listening (launch/procs.py).
Bounded: at most MAX_BUFFER bytes wait per direction; beyond that reading pauses.
"""
from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import time
from pathlib import Path

from ringserve.launch.procs import announce

POLL_S = 0.05
MAX_BUFFER = 8 << 20


class Mode:
    def __init__(self, path: Path):
        self.path, self.kind, self.delay_s, self.generation = path, "pass", 0.0, 0

    def read(self) -> None:
        try:
            words = self.path.read_text().split()
        except OSError:
            words = []
        kind = words[0] if words else "pass"
        delay = float(words[1]) / 1000.0 if kind == "delay" and len(words) > 1 else 0.0
        if (kind, delay) != (self.kind, self.delay_s):
            self.kind, self.delay_s = kind, delay
            self.generation += 1


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Proxy:
    def __init__(self, target: tuple[str, int], mode: Mode):
        self.target, self.mode = target, mode
        self.conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode.kind == "reset":
            _rst(writer)
            return
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, asyncio.TimeoutError):
            _rst(writer)
            return
        pair = (writer, up_w)
        self.conns.add(pair)
        try:
            await asyncio.gather(self.pump(reader, up_w), self.pump(up_r, writer))
        finally:
            self.conns.discard(pair)
            for w in pair:
                w.transport.abort()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        held = [0]

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                if chunk is None:
                    return
                while self.mode.kind == "stall" or time.monotonic() < due:
                    await asyncio.sleep(min(POLL_S, max(0.0, due - time.monotonic())) or POLL_S)
                writer.write(chunk)
                held[0] -= len(chunk)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                while held[0] > MAX_BUFFER:
                    await asyncio.sleep(POLL_S)
                chunk = await reader.read(65536)
                if not chunk:
                    break
                held[0] += len(chunk)
                queue.put_nowait((time.monotonic() + self.mode.delay_s, chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, None))
            try:
                await sender
            except (ConnectionError, OSError):
                pass
            writer.transport.abort()

    async def watch(self) -> None:
        while True:
            self.mode.read()
            if self.mode.kind == "reset":
                for pair in list(self.conns):
                    for w in pair:
                        _rst(w)
            await asyncio.sleep(POLL_S)


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def amain(args: argparse.Namespace) -> None:
    mode = Mode(Path(args.mode_file))
    mode.read()
    proxy = Proxy(hostport(args.target), mode)
    host, port = hostport(args.listen)
    server = await asyncio.start_server(proxy.handle, host, port)
    bound = server.sockets[0].getsockname()
    announce({"endpoint": f"tcp://{bound[0]}:{bound[1]}", "target": args.target})
    async with server:
        await proxy.watch()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="HOST:PORT (port 0: any free one)")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--mode-file", required=True)
    try:
        asyncio.run(amain(p.parse_args()))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
