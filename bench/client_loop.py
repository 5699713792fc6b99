"""The client's own CPU per request, measured alone: a real ``AsyncClient`` (what the gateway and
bench/loadgen.py use) or a real ``Client`` (its I/O thread and the caller's thread) on a loopback
DEALER in this process, against a fake master: a ROUTER thread that answers every request at once,
with the protocol's own functions (``split_batch_packed``/``split_batch``, ``answers_frames``) and
a reply header shaped like a no-op worker's (1x256 float32 inline, key, attempt, timing, epoch).

Only the client's threads are timed (``time.thread_time``, and for another thread its CPU clock
``pthread_getcpuclockid``), so the figure leaves out the fake master, libzmq's I/O threads and the
rest of the machine; on a shared machine it moves far less than bench/throughput.py's whole-process
figure. The closed loop is loadgen's: each answer's done-callback submits the next request, so the
AsyncClient figure includes that driver, as bench/throughput.py's `client_cpu_us_per_req` does.
Prints one JSON line: CPU per answered request over segments of 3,200 requests (min, median), and
`process_cpu_*`: the whole process less the fake master's thread (the client's threads and libzmq's
I/O thread). --profile uses cProfile on thread CPU time (its own overhead is large; for shares,
py-spy record --gil -r 1000 -f raw on this script is closer).

    python bench/client_loop.py [--client async|sync|both] [--concurrency 64] [--segments 10] [--profile]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import pstats
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringserve.protocol.codec import pack, pack_map_with, pack_pairs, unpack_map  # noqa: E402
from ringserve.protocol.envelope import answers_frames, split_batch, split_batch_packed  # noqa: E402
from ringserve.protocol.messages import MDP_CLIENT, MMI_NOT_IMPLEMENTED  # noqa: E402
from ringserve.protocol.sockets import recv_frames, send_frames  # noqa: E402

SEGMENT = 3200  # answered requests per measured segment


class FakeMaster(threading.Thread):
    """A ROUTER answering each request instantly: a plain request with a plain answer, mmi.batch2 and
    mmi.batch in kind (or 501 when told it predates them), mmi.ping with the epoch."""

    def __init__(self, ctx: zmq.Context, packed: bool = True, batches: bool = True, delay_s: float = 0.0):
        super().__init__(daemon=True, name="fake-master")
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.packed, self.batches = packed, batches
        self.epoch = uuid.uuid4().hex[:12]
        y = np.zeros((1, 256), np.float32).tobytes()
        # what a no-op worker's result holds (the master forwards it byte for byte), less its id
        self.count, self.pairs = pack_pairs({"key": "k", "attempt": 1, "ok": True, "model": "noop", "version": 1,
                                             "outputs": [["y", "float32", [1, 256], y]], "batch_rows": 32,
                                             "timing": {"queue_ms": 0.1, "compute_ms": 0.2}, "worker": "w1",
                                             "epoch": self.epoch})
        self.stop = threading.Event()
        self.delay_s = delay_s  # each message's answer is sent this long after it came
        self.held: collections.deque = collections.deque()  # (when, frames), in order

    def answer(self, header: dict | None) -> bytes:
        rid = header.get("id") if isinstance(header, dict) else None
        if header is not None and header.get("ack"):
            return pack({"id": rid, "ack": True, "epoch": self.epoch})
        return pack_map_with(self.count, self.pairs, "id", rid)

    def send(self, frames: list) -> None:
        if self.delay_s:
            self.held.append((time.monotonic() + self.delay_s, frames))
        else:
            send_frames(self.sock, frames)

    def release(self) -> int:
        """Send the held answers that are due; the milliseconds until the next is (50 with none)."""
        held, now = self.held, time.monotonic()
        while held and held[0][0] <= now:
            send_frames(self.sock, held.popleft()[1])
        return max(0, int((held[0][0] - now) * 1000) + 1) if held else 50

    def run(self) -> None:
        sock = self.sock
        while not self.stop.is_set():
            if not sock.poll(self.release()):
                continue
            for _ in range(1000):
                try:
                    frames = recv_frames(sock)
                except zmq.Again:
                    break
                ident, service = frames[0], frames[3].bytes
                head = [ident, b"", MDP_CLIENT, service]
                if service == b"mmi.ping":
                    self.send([*head, pack({"ok": True, "epoch": self.epoch})])
                elif service == b"mmi.batch2":
                    if not self.packed:
                        self.send([*head, MMI_NOT_IMPLEMENTED])
                        continue
                    entries, _ = split_batch_packed(frames[4:])
                    self.send([*head, *answers_frames([[self.answer(h)] for _, _, h, _ in entries], True)])
                elif service == b"mmi.batch":
                    if not self.batches:
                        self.send([*head, MMI_NOT_IMPLEMENTED])
                        continue
                    entries, _ = split_batch(frames[4:])
                    self.send([*head, *answers_frames([[self.answer(h)] for _, _, h, _ in entries], False)])
                else:
                    self.send([*head, self.answer(unpack_map(frames[4]))])
        sock.close(linger=0)


def thread_cpu(ident: int) -> float:
    """CPU seconds of the thread whose threading ident is `ident` (Linux: its pthread CPU clock)."""
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def segments_summary(values: list[float]) -> dict:
    values = sorted(values)
    return {"segments": len(values), "cpu_us_per_req_min": round(values[0], 1),
            "cpu_us_per_req_median": round(values[len(values) // 2], 1)}


def process_summary(values: list[float]) -> dict:
    """The whole process less the fake master's thread: the client's thread plus libzmq's I/O thread."""
    values = sorted(values)
    return {"process_cpu_us_per_req_min": round(values[0], 1),
            "process_cpu_us_per_req_median": round(values[len(values) // 2], 1)}


def run_async(endpoint: str, master_ident: int, concurrency: int, segments: int,
              prof: cProfile.Profile | None) -> dict:
    from ringserve.client import AsyncClient

    x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)

    async def main() -> dict:
        async with AsyncClient(endpoint, timeout=30) as c:
            loop = asyncio.get_running_loop()
            state = {"answered": 0, "errors": 0, "target": 0}
            done_all = loop.create_future()
            lat: list = []

            def submit() -> None:
                started = time.perf_counter()
                c.submit("noop", {"x": x}, timeout=30).add_done_callback(lambda f: done(f, started))

            def done(f, started: float) -> None:
                lat.append(time.perf_counter() - started)  # as loadgen does: its cost is in the figure
                if f.cancelled() or f.exception() is not None:
                    state["errors"] += 1
                state["answered"] += 1
                if state["answered"] + concurrency <= state["target"]:
                    submit()
                elif state["answered"] == state["target"] and not done_all.done():
                    done_all.set_result(None)

            async def run(n: int) -> float:
                nonlocal done_all
                state["answered"], state["target"] = 0, n
                done_all = loop.create_future()
                lat.clear()
                t0, p0, m0 = time.thread_time(), time.process_time(), thread_cpu(master_ident)
                if prof:
                    prof.enable()
                for _ in range(concurrency):
                    submit()
                await asyncio.wait_for(done_all, 60)
                if prof:
                    prof.disable()
                proc = time.process_time() - p0 - (thread_cpu(master_ident) - m0)
                return (time.thread_time() - t0) / n * 1e6, proc / n * 1e6

            await run(SEGMENT // 2)  # warm-up
            res = [await run(SEGMENT) for _ in range(segments)]
            return {**segments_summary([a for a, _ in res]), **process_summary([b for _, b in res]), "errors": state["errors"], "resent": c.stats.resent,
                    "batches_sent": c.stats.batches_sent, "batches_received": c.stats.batches_received}

    return asyncio.run(main())


def run_sync(endpoint: str, master_ident: int, concurrency: int, segments: int,
             prof: cProfile.Profile | None) -> dict:
    from ringserve.client import Client

    x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    with Client(endpoint, timeout=30) as c:
        io_ident = c._thread.ident
        errors = 0

        def run(n: int) -> tuple[float, float]:
            nonlocal errors
            window: collections.deque = collections.deque()
            t0, io0 = time.thread_time(), thread_cpu(io_ident)
            p0, m0 = time.process_time(), thread_cpu(master_ident)
            if prof:
                prof.enable()
            submitted = 0
            for _ in range(concurrency):
                window.append(c.infer_async("noop", {"x": x}, timeout=30))
                submitted += 1
            while window:
                f = window.popleft()
                try:
                    f.result(timeout=30)
                except Exception:
                    errors += 1
                if submitted < n:
                    window.append(c.infer_async("noop", {"x": x}, timeout=30))
                    submitted += 1
            if prof:
                prof.disable()
            proc = time.process_time() - p0 - (thread_cpu(master_ident) - m0)
            return (time.thread_time() - t0) / n * 1e6, (thread_cpu(io_ident) - io0) / n * 1e6, proc / n * 1e6

        run(SEGMENT // 2)
        res = [run(SEGMENT) for _ in range(segments)]
        caller, io = segments_summary([r[0] for r in res]), segments_summary([r[1] for r in res])
        total = segments_summary([r[0] + r[1] for r in res])
        return {**total, **process_summary([r[2] for r in res]), "io_thread_cpu_us_per_req_min": io["cpu_us_per_req_min"],
                "io_thread_cpu_us_per_req_median": io["cpu_us_per_req_median"],
                "caller_cpu_us_per_req_min": caller["cpu_us_per_req_min"],
                "caller_cpu_us_per_req_median": caller["cpu_us_per_req_median"],
                "errors": errors, "resent": c.stats.resent, "batches_sent": c.stats.batches_sent}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--client", choices=("async", "sync", "both"), default="both")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    p.add_argument("--segments", type=int, default=10, help="measured segments of 3,200 requests each")
    p.add_argument("--master", choices=("batch2", "batch", "plain"), default="batch2",
                   help="what the fake master reads: batch2 (today's), batch (501 to mmi.batch2), plain (501 to both)")
    p.add_argument("--answer-delay-ms", type=float, default=0.0,
                   help="the fake master answers each message this long after it came (the whole system's "
                        "round trip at 64 in flight is about 10 ms: the client sleeps between messages, as there)")
    p.add_argument("--profile", action="store_true", help="cProfile the measured client thread, top functions to stderr")
    args = p.parse_args(argv)
    ctx = zmq.Context()
    master = FakeMaster(ctx, packed=args.master == "batch2", batches=args.master != "plain",
                        delay_s=args.answer_delay_ms / 1000.0)
    master.start()
    prof = cProfile.Profile(time.thread_time) if args.profile else None  # CPU, not the GIL waits
    out: dict = {"concurrency": args.concurrency, "master": args.master, "answer_delay_ms": args.answer_delay_ms}
    try:
        if args.client in ("async", "both"):
            out["async"] = run_async(master.endpoint, master.ident, args.concurrency, args.segments, prof)
        if args.client in ("sync", "both"):
            # with --profile the sync figure profiles the caller's thread only (the I/O thread is another)
            out["sync"] = run_sync(master.endpoint, master.ident, args.concurrency, args.segments,
                                   prof if args.client == "sync" else None)
    finally:
        master.stop.set()
        master.join(5)
        ctx.destroy(linger=0)
    print(json.dumps(out))
    if prof:
        pstats.Stats(prof, stream=sys.stderr).strip_dirs().sort_stats("tottime").print_stats(35)


if __name__ == "__main__":
    main()
