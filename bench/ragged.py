"""Ragged batching: mean batch size and throughput for requests of mixed lengths; prints one JSON line.

1 master, 1 worker with the default batching flags (--max-batch-size 32, --max-queue-delay-us 0),
serving ``ringserve.worker.demo:seq_encoder`` (a 2-layer transformer encoder, width 64, buckets
16/32/64/128). Single-row requests whose lengths are uniform in 1..128, kept `--concurrency` in
flight by a closed loop, in three configurations:

  unpadded      the model declares nothing; each request is sent at its own length (with its mask):
                only requests of equal length may share a batch (before ragged batching)
  client_padded the model declares nothing; the client pads every request to 128 with a 0 mask:
                everything batches, every request costs 128 tokens (the old workaround)
  ragged        the model declares its input variable-length; requests are sent unpadded without
                a mask: the worker groups them by bucket, pads and builds the mask

The mean batch size is exact: each reply's header says its batch's rows (``batch_rows``), so the
number of batches is the sum over requests of rows / batch_rows. ``token_efficiency`` is real
tokens over tokens computed (padding included), from the lengths sent and the bucket rule.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentiles  # noqa: E402
from ringserve.client import Client  # noqa: E402
from ringserve.launch.logsetup import configure_logging  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_for_workers  # noqa: E402

EPH = "tcp://127.0.0.1:*"
BUCKETS = (16, 32, 64, 128)


def requests(n: int, mode: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, BUCKETS[-1] + 1))
        ids = rng.integers(1, 1000, (1, length)).astype(np.int64)
        if mode == "ragged":
            out.append({"input_ids": ids})
        elif mode == "unpadded":
            out.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        else:
            padded, mask = np.zeros((1, BUCKETS[-1]), np.int64), np.zeros((1, BUCKETS[-1]), np.int64)
            padded[:, :length], mask[:, :length] = ids, 1
            out.append({"input_ids": padded, "attention_mask": mask})
    return out


def measure(tmp: Path, mode: str, args) -> dict:
    model_arg = "seq=ringserve.worker.demo:seq_encoder" + ("" if mode == "ragged" else ",arg.ragged=false")
    master = RoleProcess("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH,
                                                     "--log-level", "warning"], tmp / f"master-{mode}.log")
    worker = None
    try:
        worker = RoleProcess("ringserve.launch.worker", ["--master", master.info["backend"], "--model", model_arg,
                                                         "--device", args.device, "--log-level", "warning",
                                                         "--threads", str(os.environ.get("RS_THREADS", 1))],
                             tmp / f"worker-{mode}.log")
        wait_for_workers(master.info["admin"], 1, 60)
        pool = requests(512, mode)
        with Client(master.info["frontend"], timeout=60) as c:
            run(c, pool, args.concurrency, 1.0)  # warm-up
            n, batches, lat, errors, took = run(c, pool, args.concurrency, args.seconds)
    finally:
        if worker:
            worker.stop()
        master.stop()
    p50, p99 = percentiles(lat)
    return {"req_per_s": round(n / took, 1), "mean_batch_size": round(n / max(batches, 1e-9), 2),
            "p50_ms": round(p50, 1), "p99_ms": round(p99, 1), "errors": errors}


def run(c: Client, pool: list, concurrency: int, seconds: float):
    """Closed loop: `concurrency` single-row requests in flight for `seconds`."""
    started, lat, errors, batches, n, k = {}, [], 0, 0.0, 0, 0
    t0 = time.perf_counter()
    end = t0 + seconds

    def submit():
        nonlocal k
        f = c.infer_async("seq", pool[k % len(pool)], timeout=60)
        k += 1
        started[f] = time.perf_counter()
        return f

    inflight = {submit() for _ in range(concurrency)}
    while inflight:
        done, inflight = wait(inflight, return_when=FIRST_COMPLETED, timeout=120)
        if not done:
            raise RuntimeError("no reply for 120 s")
        now = time.perf_counter()
        for f in done:
            lat.append(now - started.pop(f))
            if f.exception() is not None:
                errors += 1
            else:
                n += 1
                batches += 1 / f.result().header["batch_rows"]
            if now < end:
                inflight.add(submit())
    return n, batches, lat, errors, time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="measurement time per configuration")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    configure_logging("bench", "warning")
    tmp = Path(tempfile.mkdtemp(prefix="rs-ragged-"))
    lengths = np.random.default_rng(0).integers(1, BUCKETS[-1] + 1, 100_000)
    bucketed = np.array([next(b for b in BUCKETS if n <= b) for n in lengths])
    r = {"device": args.device, "concurrency": args.concurrency, "lengths": f"uniform 1..{BUCKETS[-1]}",
         "buckets": list(BUCKETS), "max_batch_size": 32, "max_queue_delay_us": 0}
    for mode in ("unpadded", "client_padded", "ragged"):
        for k, v in measure(tmp, mode, args).items():
            r[f"{mode}_{k}"] = v
    r["client_padded_token_efficiency"] = round(lengths.mean() / BUCKETS[-1], 3)
    r["ragged_token_efficiency"] = round(lengths.mean() / bucketed.mean(), 3)
    r["ragged_vs_unpadded_req_per_s"] = round(r["ragged_req_per_s"] / r["unpadded_req_per_s"], 2)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
