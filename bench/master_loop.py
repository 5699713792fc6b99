"""The master's own loop CPU per request, measured alone: a real Broker on loopback sockets in this
process, a fake worker DEALER that answers every REQUEST at once and two fake client DEALERs that
send 32-request mmi.batch messages. Only ``Broker.turn`` is timed (``time.thread_time``), so the
figure excludes the fake peers, libzmq's I/O thread and whatever else runs on the machine; on a
shared machine it moves far less than bench/throughput.py's whole-system figures. Prints one JSON
line: the master thread's CPU per answered request over segments of 3,200 requests (min, median),
and the cyclic GC's share of it (its thread time inside the turns, per generation).

    python bench/master_loop.py [--turns 500] [--cache] [--profile] [--framing 1|2] [--client-framing 1|2]

--framing and --client-framing choose the fake peers' framing (issue 22: 2 packs the headers of a
message into its first frame; 1 is the earlier releases' one frame per header).
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringserve.master.broker import Broker, BrokerConfig  # noqa: E402
from ringserve.protocol.codec import encode_tensors, pack  # noqa: E402
from ringserve.protocol.codec import unpack_map  # noqa: E402
from ringserve.protocol.envelope import (  # noqa: E402
    batch_frames, batch_frames_packed, parse_dispatch, request_header, split_replies,
)
from ringserve.protocol.messages import HEARTBEAT, MDP_CLIENT, READY, REPLY, REQUEST, WORKER_PROTO  # noqa: E402
from ringserve.protocol.sockets import recv_frames, send_frames  # noqa: E402

EPH = "tcp://127.0.0.1:*"
PER_MESSAGE = 32
SEGMENT = 50  # turns pairs per segment: 2 clients x 32 requests x 50 = 3,200 requests


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=500, help="rounds of (client batches in, worker replies in)")
    p.add_argument("--cache", action="store_true", help="the model is cache=true and every input is the same")
    p.add_argument("--profile", action="store_true", help="cProfile Broker.turn and print the top functions")
    p.add_argument("--sort", default="cumtime", choices=("cumtime", "tottime"), help="the profile's order")
    p.add_argument("--framing", type=int, default=2, choices=(1, 2),
                   help="the worker hop's framing the fake worker reads and writes (1: a frame per header)")
    p.add_argument("--client-framing", type=int, default=2, choices=(1, 2),
                   help="2: the fake clients send mmi.batch2 (headers packed), 1: mmi.batch")
    p.add_argument("--gc-threshold", type=int, default=0,
                   help="after start-up: gc.freeze() and generation 0's threshold set to this (0: Python's defaults)")
    args = p.parse_args(argv)
    ctx = zmq.Context()
    b = Broker(BrokerConfig(EPH, EPH, EPH, heartbeat_interval=60.0), ctx)
    b.in_grace = False
    b.last_heartbeat = time.monotonic()
    worker = ctx.socket(zmq.DEALER)
    worker.connect(b.backend_ep)
    info = {"version": 1, **({"cache": True} if args.cache else {})}
    worker.send_multipart([WORKER_PROTO, READY, pack({"models": {"noop": info}, "credit": 64, "name": "w1",
                                                      "framing": args.framing})])
    packed = [False]  # whether the master said it reads framing 2 (its HEARTBEAT)
    clients = [ctx.socket(zmq.DEALER) for _ in range(2)]
    for c in clients:
        c.connect(b.frontend_ep)
    x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    meta, _ = encode_tensors({"x": x})
    ids = iter(range(1 << 62))
    prof = cProfile.Profile() if args.profile else None
    gc_time = [0.0, 0.0, 0.0]  # the cyclic GC's thread time inside Broker.turn, per generation
    gc_runs = [0, 0, 0]
    in_turn, gc_t0 = [False], [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if not in_turn[0]:
            return
        if phase == "start":
            gc_t0[0] = time.thread_time()
        else:
            gc_time[info["generation"]] += time.thread_time() - gc_t0[0]
            gc_runs[info["generation"]] += 1

    gc.callbacks.append(on_gc)

    def turn() -> float:
        t0 = time.thread_time()
        in_turn[0] = True
        if prof:
            prof.enable()
        b.turn(5)
        if prof:
            prof.disable()
        in_turn[0] = False
        return time.thread_time() - t0

    def answer_worker() -> None:
        while True:
            try:
                frames = recv_frames(worker)
            except zmq.Again:
                return
            if len(frames) >= 3 and frames[1].bytes == HEARTBEAT:
                packed[0] = args.framing >= 2 and unpack_map(frames[2]).get("framing") == 2
            if len(frames) < 3 or frames[1].bytes != REQUEST:
                continue
            headers = [pack({"id": d.cid, "key": d.key, "attempt": d.attempt, "ok": True, "model": "noop",
                             "version": 1, "batch_rows": 1, "outputs": [["y", "float32", [1, 256], x.tobytes()]],
                             "worker": "w1", "epoch": b.epoch, "timing": {"queue_ms": 0.1, "compute_ms": 0.2}})
                       for d in parse_dispatch(frames[2:])]
            send_frames(worker, [WORKER_PROTO, REPLY, *([pack(headers)] if packed[0] else headers)])

    def read_clients() -> int:
        got = 0
        for c in clients:
            while True:
                try:
                    frames = recv_frames(c)
                except zmq.Again:
                    break
                got += len(split_replies(frames[3:])) if frames[2].bytes in (b"mmi.batch", b"mmi.batch2") else 1
        return got

    for _ in range(20):
        b.turn(5)
    if args.gc_threshold:  # the lever a role's start-up code may pull (measured here, applied in launch/)
        gc.freeze()
        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    segments, cpu, answered = [], 0.0, 0
    gc_time[:], gc_runs[:] = [0.0, 0.0, 0.0], [0, 0, 0]
    total_cpu, total_answered = 0.0, 0
    for i in range(1, args.turns + 1):
        for c in clients:
            reqs = [(b"noop", [pack(request_header(f"r{next(ids)}", meta, timeout_ms=30000.0))])
                    for _ in range(PER_MESSAGE)]
            if args.client_framing == 2:
                send_frames(c, [b"", MDP_CLIENT, b"mmi.batch2", *batch_frames_packed(reqs)])
            else:
                send_frames(c, [b"", MDP_CLIENT, b"mmi.batch", *batch_frames(reqs)])
        time.sleep(0.0005)
        cpu += turn()
        time.sleep(0.0005)
        answer_worker()
        time.sleep(0.0005)
        cpu += turn()
        time.sleep(0.0005)
        answered += read_clients()
        if i % SEGMENT == 0:
            total_cpu, total_answered = total_cpu + cpu, total_answered + answered
            segments.append(cpu / max(answered, 1) * 1e6)
            cpu, answered = 0.0, 0
    b.close()
    ctx.destroy(linger=0)
    segments.sort()
    print(json.dumps({"cache": args.cache, "gc_threshold": args.gc_threshold or None, "segments": len(segments),
                      "master_thread_cpu_us_per_req_min": round(segments[0], 1),
                      "master_thread_cpu_us_per_req_median": round(segments[len(segments) // 2], 1),
                      # the cyclic GC inside the turns: its share of their CPU, and its runs per generation
                      "gc_share": round(sum(gc_time) / max(total_cpu, 1e-9), 3),
                      "gc_us_per_req": [round(t / max(total_answered, 1) * 1e6, 2) for t in gc_time],
                      "gc_runs": gc_runs}))
    if prof:
        stats = pstats.Stats(prof, stream=sys.stderr)
        stats.strip_dirs().sort_stats(args.sort).print_stats(40)


if __name__ == "__main__":
    main()
