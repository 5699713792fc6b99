"""Shared benchmark helpers: a closed-loop load generator and percentile maths."""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, wait

import numpy as np


def percentiles(lat_s: list[float]) -> tuple[float, float]:
    if not lat_s:
        return float("nan"), float("nan")
    a = np.array(lat_s) * 1000.0
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def closed_loop(client, model: str, make_inputs, concurrency: int, seconds: float, timeout: float = 10.0,
                latencies: list | None = None):
    """Keep `concurrency` requests in flight for `seconds`; return (req/s, p50 ms, p99 ms, errors).

    Every latency (seconds) is appended to `latencies` when one is given, for merging across processes."""
    lat = latencies if latencies is not None else []
    errors = 0
    started: dict = {}
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()

    def submit():
        f = client.infer_async(model, make_inputs(), timeout=timeout)
        started[f] = time.perf_counter()
        return f

    inflight = {submit() for _ in range(concurrency)}
    done_count = 0
    while inflight:
        done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
        now = time.perf_counter()
        for f in done:
            lat.append(now - started.pop(f))
            done_count += 1
            if f.exception() is not None:
                errors += 1
            if now < end:
                inflight.add(submit())
    took = time.perf_counter() - t0
    p50, p99 = percentiles(lat)
    return done_count / took, p50, p99, errors


def in_process_rate(fn, seconds: float) -> float:
    """Calls per second of fn() for about `seconds`."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)
