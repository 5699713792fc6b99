"""Master high availability under load; prints one JSON line.

Two active masters (each the other's peer), two workers registered with both, a closed-loop
client (16 in flight) given both masters. Round 1 SIGKILLs the master the client is on; round 2
(a fresh pair) SIGSTOPs it and SIGCONTs it after the run. Default heartbeats everywhere.
Reports requests, lost (errors), duplicated (second answers the client saw), failover_gap_s
and gap_hung_s (the longest time without any answer around each fault), and the throughput in
the 5 s before the kill and the 5 s after the takeover.

    python bench/ha.py [--seconds 12] [--fault-at 6]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringserve.client import Client  # noqa: E402
from ringserve.launch.logsetup import configure_logging  # noqa: E402
from ringserve.launch.procs import RoleProcess, free_tcp_ports, wait_for_workers  # noqa: E402


def start_pair(tmp: Path, procs: list) -> tuple[list[dict], list[RoleProcess]]:
    ports = free_tcp_ports(6)
    eps = [{k: f"tcp://127.0.0.1:{ports[3 * i + j]}" for j, k in enumerate(("frontend", "backend", "admin"))}
           for i in range(2)]
    masters = []
    for i in range(2):
        m = RoleProcess("ringserve.launch.master", ["--frontend", eps[i]["frontend"], "--backend", eps[i]["backend"],
                                                    "--admin", eps[i]["admin"], "--peers", eps[1 - i]["admin"]],
                        tmp / f"master{i}.log", wait_ready=False)
        procs.append(m)
        masters.append(m)
    for m in masters:
        m.wait_ready(60)
    backends = ",".join(e["backend"] for e in eps)
    workers = [RoleProcess("ringserve.launch.worker", ["--master", backends, "--name", f"w{k}", "--threads", "1",
                                                       "--model", "mlp=ringserve.worker.demo:mlp"],
                           tmp / f"w{k}.log", wait_ready=False) for k in range(2)]
    procs.extend(workers)
    for w in workers:
        w.wait_ready(90)
    for e in eps:
        wait_for_workers(e["admin"], 2, timeout=60)
    return eps, masters


def round_(tmp: Path, fault: str, seconds: float, fault_at: float, concurrency: int) -> dict:
    procs: list[RoleProcess] = []
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        eps, masters = start_pair(tmp, procs)
        x = np.ones((1, 256), np.float32)
        times: list[float] = []
        lost = 0
        with Client([e["frontend"] for e in eps], timeout=20) as c:
            t0 = time.monotonic()
            faulted = threading.Event()

            def do_fault():
                time.sleep(fault_at)
                victim = masters[[e["frontend"] for e in eps].index(c.master)]
                os.kill(victim.pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
                faulted.set()
                return victim

            result: dict = {}
            t = threading.Thread(target=lambda: result.update(victim=do_fault()), daemon=True)
            t.start()
            inflight = {c.infer_async("mlp", {"x": x}) for _ in range(concurrency)}
            end = t0 + seconds
            while inflight:
                done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                now = time.monotonic()
                for f in done:
                    if f.exception() is None:
                        times.append(now - t0)
                    else:
                        lost += 1
                    if now < end:
                        inflight.add(c.infer_async("mlp", {"x": x}))
            t.join(5)
            duplicated = c.stats.duplicates_dropped
            failovers = c.stats.failovers
            victim = result.get("victim")
            if victim is not None and fault == "stop":
                os.kill(victim.pid, signal.SIGCONT)
        around = [b - a for a, b in zip(times, times[1:]) if fault_at - 1 <= a <= fault_at + 4]
        before = sum(1 for s in times if fault_at - 5 <= s < fault_at) / min(5.0, fault_at)
        after_start = fault_at + (max(around) if around else 0.0)
        after = sum(1 for s in times if after_start <= s < after_start + 5) / max(min(5.0, seconds - after_start), 1e-9)
        return {"requests": len(times) + lost, "lost": lost, "duplicated": duplicated, "failovers": failovers,
                "gap_s": round(max(around, default=0.0), 3), "throughput_before": round(before, 1),
                "throughput_after": round(after, 1)}
    finally:
        for p in reversed(procs):
            try:
                os.kill(p.pid, signal.SIGCONT)
            except OSError:
                pass
            p.stop(timeout=3)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--fault-at", type=float, default=6.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    configure_logging("bench", "warning")
    with tempfile.TemporaryDirectory(prefix="ringserve-ha-") as tmp:
        kill = round_(Path(tmp) / "kill", "kill", args.seconds, args.fault_at, args.concurrency)
        hung = round_(Path(tmp) / "stop", "stop", args.seconds, args.fault_at, args.concurrency)
    print(json.dumps({"requests": kill["requests"] + hung["requests"], "lost": kill["lost"] + hung["lost"],
                      "duplicated": kill["duplicated"] + hung["duplicated"],
                      "failover_gap_s": kill["gap_s"], "gap_hung_s": hung["gap_s"],
                      "throughput_before": kill["throughput_before"], "throughput_after": kill["throughput_after"],
                      "hung_throughput_before": hung["throughput_before"],
                      "hung_throughput_after": hung["throughput_after"],
                      "failovers": kill["failovers"] + hung["failovers"]}))


if __name__ == "__main__":
    main()
