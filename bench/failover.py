"""Failover under load; prints one JSON line.

Closed-loop load (32 in flight) on 3 workers; after a while one worker is SIGKILLed.
Reports requests answered, lost (errors), duplicated (second answers seen by the client),
time until the master evicted the dead worker, and p50/p99 latency in the second before
and the second after the kill.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentiles  # noqa: E402
from ringserve.client import Client  # noqa: E402
from ringserve.client.admin import AdminClient  # noqa: E402
from ringserve.launch.logsetup import configure_logging  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_for_workers  # noqa: E402

EPH = "tcp://127.0.0.1:*"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--kill-at", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--heartbeat-interval", type=float, default=0.25)
    p.add_argument("--liveness", type=int, default=3)
    args = p.parse_args(argv)
    configure_logging("bench", "warning")  # logs to stderr: stdout is the one JSON line
    tmp = Path(tempfile.mkdtemp(prefix="rs-failover-"))
    hb = ["--heartbeat-interval", str(args.heartbeat_interval), "--heartbeat-liveness", str(args.liveness)]
    procs = [RoleProcess("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH,
                                           "--log-level", "warning", *hb], tmp / "master.log")]
    master = procs[0]
    try:
        workers = [RoleProcess("ringserve.launch.worker", ["--master", master.info["backend"], "--name", f"w{i}",
                                                 "--model", "echo=ringserve.worker.demo:slow,arg.delay=0.002",
                                                 "--threads", "1", "--log-level", "warning", *hb],
                               tmp / f"w{i}.log", wait_ready=False) for i in range(3)]
        procs += workers
        for w in workers:
            w.wait_ready()
        wait_for_workers(master.info["admin"], 3, 60)
        records: list[tuple[float, float, bool]] = []
        x = {"x": np.ones((1, 16), np.float32)}
        with Client(master.info["frontend"], timeout=30) as c:
            t_start = time.monotonic()
            stop_at = t_start + args.seconds

            def load():
                started = {}
                inflight = set()
                for _ in range(args.concurrency):
                    f = c.infer_async("echo", x)
                    started[f] = time.monotonic()
                    inflight.add(f)
                while inflight:
                    done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                    now = time.monotonic()
                    for f in done:
                        records.append((started.pop(f), now, f.exception() is None))
                        if now < stop_at:
                            nf = c.infer_async("echo", x)
                            started[nf] = time.monotonic()
                            inflight.add(nf)

            t = threading.Thread(target=load)
            t.start()
            time.sleep(args.kill_at)
            killed_at = time.monotonic()
            workers[1].signal(signal.SIGKILL)
            admin = AdminClient(master.info["admin"])
            while "w1" in {w["name"] for w in admin.status()["workers"]} and time.monotonic() - killed_at < 30:
                time.sleep(0.005)
            eviction_s = time.monotonic() - killed_at
            t.join(timeout=120)
            duplicated = c.stats.duplicates_dropped
        before = [e - s for s, e, _ in records if killed_at - 1 <= e < killed_at]
        after = [e - s for s, e, _ in records if killed_at <= e < killed_at + 1]
        b50, b99 = percentiles(before)
        a50, a99 = percentiles(after)
        print(json.dumps({
            "requests": len(records), "lost": sum(1 for *_, ok in records if not ok), "duplicated": duplicated,
            "eviction_s": round(eviction_s, 3),
            "eviction_limit_s": args.heartbeat_interval * args.liveness,
            "p50_before_ms": round(b50, 2), "p99_before_ms": round(b99, 2),
            "p50_after_ms": round(a50, 2), "p99_after_ms": round(a99, 2),
        }))
    finally:
        for proc in reversed(procs):
            proc.stop()


if __name__ == "__main__":
    main()
