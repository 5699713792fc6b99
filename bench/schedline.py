"""Where the no-op pipeline waits: every thread's run slices from the kernel's scheduler, not samples.

`python bench/schedline.py` starts bench/throughput.py's no-op configuration (1 master, 1 worker on
its defaults, 2 load processes x 32 in flight, single-row requests) and, inside the measured window,
records `perf sched record -a` for `--record` seconds (root, or perf_event_paranoid <= 1). From
`perf sched timehist` it prints one JSON line:
  cpus_busy        share of the window with 0, 1, 2, ... of our threads on a CPU
  alone_ms         per thread, the time it was the only one of our threads on a CPU (the others
                   waiting: the serial part of the chain)
  threads          per thread: run ms, slices, mean slice us, mean and max scheduling delay (wake-up
                   to running) us
  waves            how the two load processes' waves line up (``wave_offsets``): the cycle, the
                   median time from a C0 burst to the nearest C1 one, the share of C0 bursts
                   within an eighth of a cycle of a C1 burst (merged)
Threads are named by role: M (master), W (worker), C0, C1 (load processes); .main is the process's
first thread (the master's loop, the worker's socket thread, the client's event loop), .io libzmq's
I/O thread, W.comp the worker's compute thread. `--timeline MS` also prints, to stderr, MS
milliseconds of the window as one row per thread (a # per 100 us with the thread on a CPU).
perf itself costs a few per cent of a core while it records: read the shares and the order of
events, not the rate.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_TASK = re.compile(r"^(.*)\[(\d+)(?:/(\d+))?\]$")


def parse_timehist(text: str) -> list[tuple[float, float, str, str, int, float]]:
    """`perf sched timehist` (no -w) rows: (start s, end s, thread name, tid, pid, sched delay ms)."""
    rows = []
    for line in text.splitlines():
        p = line.split()
        if len(p) != 6 or not p[0][0].isdigit() or p[2] == "<idle>":
            continue
        try:
            end, sch, run = float(p[0]), float(p[4]), float(p[5])
        except ValueError:
            continue
        m = _TASK.match(p[2])
        if m is None:
            continue
        tid = m.group(2)
        pid = int(m.group(3) or tid)
        rows.append((end - run / 1000.0, end, m.group(1), tid, pid, sch))
    return rows


def label_threads(rows, master: int, worker: int, loads: list[int]) -> dict[str, str]:
    """tid -> role label: the process's first thread `.main`, libzmq's first I/O thread `.io`, the
    worker's busiest other Python thread `.comp` (its compute thread)."""
    roles = {master: "M", worker: "W", **{pid: f"C{i}" for i, pid in enumerate(loads)}}
    busy: collections.Counter = collections.Counter()
    names = {}
    for _, _, name, tid, pid, _ in rows:
        busy[tid] += 1
        names[tid] = (name, pid)
    labels = {}
    for tid, (name, pid) in names.items():
        role = roles.get(pid)
        if role is None:
            continue
        if int(tid) == pid:
            labels[tid] = f"{role}.main"
        elif name == "ZMQbg/IO/0":
            labels[tid] = f"{role}.io"
    if worker:
        others = [tid for tid, (name, pid) in names.items() if pid == worker and tid not in labels
                  and not name.startswith("ZMQbg")]
        if others:
            labels[max(others, key=lambda t: busy[t])] = "W.comp"
    return labels


def summarize(rows, labels: dict[str, str]) -> dict:
    """cpus_busy, alone_ms and per-thread figures over the rows' window (our threads only)."""
    ours = [(a, b, labels[tid], sch) for a, b, _, tid, _, sch in rows if tid in labels]
    if not ours:
        return {}
    t0, t1 = min(r[0] for r in ours), max(r[1] for r in ours)
    events = sorted([(a, 1, lab) for a, _, lab, _ in ours] + [(b, -1, lab) for _, b, lab, _ in ours])
    on: collections.Counter = collections.Counter()
    busy: collections.Counter = collections.Counter()
    alone: collections.Counter = collections.Counter()
    last = t0
    for t, d, lab in events:
        k = sum(1 for v in on.values() if v > 0)
        if t > last:
            busy[k] += t - last
        if k == 1:
            alone[next(x for x, v in on.items() if v > 0)] += t - last
        last = t
        on[lab] += d
    span = max(t1 - t0, 1e-9)
    per: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for a, b, lab, sch in ours:
        x = per[lab]
        x[0] += 1
        x[1] += b - a
        x[2] += sch
        x[3] = max(x[3], sch)
    return {"window_s": round(span, 3),
            "cpus_busy": {k: round(v / span, 3) for k, v in sorted(busy.items()) if v / span >= 0.0005},
            "alone_ms": {k: round(v * 1000, 1) for k, v in alone.most_common()},
            "threads": {lab: {"run_ms": round(x[1] * 1000, 1), "slices": x[0],
                              "mean_slice_us": round(x[1] / x[0] * 1e6, 1),
                              "mean_sched_delay_us": round(x[2] / x[0] * 1000, 1),
                              "max_sched_delay_us": round(x[3] * 1000, 1)}
                        for lab, x in sorted(per.items(), key=lambda kv: -kv[1][1])}}


def wave_offsets(rows, labels: dict[str, str], gap_s: float = 0.0003) -> dict:
    """How the two load processes' waves line up: each client's bursts (its event loop's slices
    closer than `gap_s` joined), the median time from one C0 burst to the next (the cycle), and for
    each C0 burst the time to the nearest C1 burst's start: ~0 when the waves travel merged, up to
    half the cycle when they are evenly apart."""
    starts: dict[str, list[list[float]]] = {"C0.main": [], "C1.main": []}
    for a, b, _, tid, _, _ in sorted(rows):
        lab = labels.get(tid)
        if lab in starts:
            bursts = starts[lab]
            if bursts and a - bursts[-1][1] < gap_s:
                bursts[-1][1] = max(bursts[-1][1], b)
            else:
                bursts.append([a, b])
    b0, b1 = sorted(x[0] for x in starts["C0.main"]), sorted(x[0] for x in starts["C1.main"])
    if len(b0) < 3 or not b1:
        return {}
    offsets = []
    for a in b0:
        i = bisect.bisect_left(b1, a)
        offsets.append(min(abs(a - b1[j]) for j in (i - 1, i) if 0 <= j < len(b1)))
    cycle = statistics.median([y - x for x, y in zip(b0, b0[1:])])
    return {"cycle_ms": round(cycle * 1000, 3), "offset_median_ms": round(statistics.median(offsets) * 1000, 3),
            "merged_share": round(sum(o < cycle / 8 for o in offsets) / len(offsets), 3)}


def timeline(rows, labels: dict[str, str], start_s: float, ms: float, step_ms: float = 0.1) -> str:
    """`ms` milliseconds from `start_s` into the window, one row per thread, # = on a CPU."""
    ours = [(a, b, labels[tid]) for a, b, _, tid, _, _ in rows if tid in labels]
    t0 = min(r[0] for r in ours) + start_s
    ncol = int(ms / step_ms)
    order = sorted(set(labels.values()))
    grid = {lab: [" "] * ncol for lab in order}
    for a, b, lab in ours:
        lo, hi = (a - t0) * 1000 / step_ms, (b - t0) * 1000 / step_ms
        for c in range(max(0, int(lo)), min(ncol, int(hi) + 1)):
            if c < hi and c + 1 > lo:
                grid[lab][c] = "#"
    ruler = "".join(str(int(i * step_ms) % 10) if i % int(round(1 / step_ms)) == 0 else "." for i in range(ncol))
    return "\n".join([f"{lab:8s}|{''.join(g)}" for lab, g in grid.items()] + [f"{'ms':8s}|{ruler}"])


def _children() -> set[int]:
    """This process's child pids (Linux: /proc/self/task/*/children)."""
    kids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                kids.update(int(x) for x in f.read().split())
        except OSError:
            continue
    return kids


def main(argv=None) -> None:
    from bench.throughput import serve_and_measure

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="the load's measured window")
    p.add_argument("--record", type=float, default=1.0, help="perf's recording, inside the window")
    p.add_argument("--timeline", type=float, default=0.0, help="milliseconds of timeline to print (stderr)")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="rs-sched-"))
    data = tmp / "sched.data"
    # run_load starts measuring 3.5 s after it is called (0.5 s warm-up + 3 s start-up)
    delay = 3.5 + max(0.0, (args.seconds - args.record) / 2)
    children: set[int] = set()
    pids: dict[str, int] = {}

    def record() -> None:
        time.sleep(delay)
        children.update(_children())  # the load processes, by now all started
        subprocess.run(["perf", "sched", "record", "-a", "-o", str(data), "--", "sleep", str(args.record)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=args.record + 60)
    rec = threading.Thread(target=record)

    def start_recording(master_pid: int, worker_pid: int) -> None:
        pids.update(master=master_pid, worker=worker_pid)
        rec.start()
    # throughput.py's no-op configuration: 64 in flight from 2 load processes, the worker's defaults
    load = argparse.Namespace(concurrency=64, load_processes=2, seconds=args.seconds, device="cpu")
    res = serve_and_measure(tmp, "noop=ringserve.worker.demo:noop", "noop", load, [], on_start=start_recording)
    rec.join(args.record + 90)
    text = subprocess.run(["perf", "sched", "timehist", "-i", str(data)], capture_output=True, text=True,
                          timeout=120).stdout
    rows = parse_timehist(text)
    zmq_pids = {pid for _, _, name, _, pid, _ in rows if name.startswith("ZMQbg/IO")}  # not the resource tracker
    loads = sorted((children - set(pids.values())) & zmq_pids)
    labels = label_threads(rows, pids["master"], pids["worker"], loads)
    out = {"req_per_s": res["req_per_s"], "errors": res["errors"], "master_cpu_us_per_req": res["master_cpu_us"],
           "worker_cpu_us_per_req": res["worker_cpu_us"], "client_cpu_us_per_req": res["client_cpu_us"],
           **summarize(rows, labels), "waves": wave_offsets(rows, labels)}
    if args.timeline:
        print(timeline(rows, labels, 0.1, args.timeline), file=sys.stderr)
    print(json.dumps(out))
    try:
        os.unlink(data)
    except OSError:
        pass


if __name__ == "__main__":
    main()
