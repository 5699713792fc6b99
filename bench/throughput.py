"""Throughput and latency through ringserve vs the same model in-process; prints one JSON line.

1 master, 1 worker, closed loop with 64 requests in flight (single-row requests):
no-op model, MLP 256->1024->1024->10 fp32 unbatched, and MLP with max_batch_size=32,
beside the MLP called in-process at batch 1 and batch 32 in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import closed_loop, in_process_rate  # noqa: E402
from ringserve.client import Client  # noqa: E402
from ringserve.launch.logsetup import configure_logging  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_for_workers  # noqa: E402
from ringserve.worker import demo  # noqa: E402

EPH = "tcp://127.0.0.1:*"


def serve_and_measure(tmp: Path, model_arg: str, model: str, make, seconds: float, concurrency: int,
                      worker_args: list[str], device: str) -> tuple:
    master = RoleProcess("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH,
                                           "--log-level", "warning"], tmp / "master.log")
    worker = None
    try:
        worker = RoleProcess("ringserve.launch.worker", ["--master", master.info["backend"], "--model", model_arg,
                                               "--device", device, "--log-level", "warning",
                                               "--threads", str(os.environ.get("RS_THREADS", 1)), *worker_args],
                             tmp / "worker.log")
        wait_for_workers(master.info["admin"], 1, 60)
        with Client(master.info["frontend"], timeout=30) as c:
            closed_loop(c, model, make, concurrency, min(0.5, seconds))  # warm-up
            return closed_loop(c, model, make, concurrency, seconds)
    finally:
        if worker:
            worker.stop()
        master.stop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=4.0, help="measurement time per configuration")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    configure_logging("bench", "warning")  # logs to stderr: stdout is the one JSON line
    torch.set_num_threads(int(os.environ.get("RS_THREADS", 1)))
    tmp = Path(tempfile.mkdtemp(prefix="rs-bench-"))
    x1 = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    one = lambda: {"x": x1}  # noqa: E731
    r = {"device": args.device, "concurrency": args.concurrency, "torch_threads": torch.get_num_threads()}

    rate, p50, p99, err = serve_and_measure(tmp, "noop=ringserve.worker.demo:noop", "noop", one, args.seconds,
                                            args.concurrency, [], args.device)
    r.update(noop_req_per_s=round(rate, 1), noop_p50_ms=round(p50, 3), noop_p99_ms=round(p99, 3))
    rate, p50, p99, err2 = serve_and_measure(tmp, "mlp=ringserve.worker.demo:mlp", "mlp", one, args.seconds,
                                             args.concurrency, ["--max-batch-size", "1"], args.device)
    r.update(mlp_req_per_s=round(rate, 1), mlp_p50_ms=round(p50, 3), mlp_p99_ms=round(p99, 3))
    rate, p50, p99, err3 = serve_and_measure(tmp, "mlp=ringserve.worker.demo:mlp", "mlp", one, args.seconds,
                                             args.concurrency, ["--max-batch-size", "32",
                                                                "--max-queue-delay-us", "2000"], args.device)
    r.update(mlp_batched_req_per_s=round(rate, 1), mlp_batched_p50_ms=round(p50, 3),
             mlp_batched_p99_ms=round(p99, 3))

    dev = torch.device(args.device)
    model = demo.mlp().eval().to(dev)
    x32 = torch.from_numpy(np.repeat(x1, 32, axis=0))

    def call(batch):
        with torch.inference_mode():
            out = model(batch.to(dev))["logits"].cpu()
        return out

    bs1 = in_process_rate(lambda: call(torch.from_numpy(x1)), args.seconds / 2)
    bs32 = in_process_rate(lambda: call(x32), args.seconds / 2) * 32
    r.update(inprocess_bs1_req_per_s=round(bs1, 1), inprocess_bs32_samples_per_s=round(bs32, 1),
             mlp_vs_inprocess_bs1=round(r["mlp_req_per_s"] / bs1, 3),
             mlp_batched_vs_inprocess_bs1=round(r["mlp_batched_req_per_s"] / bs1, 3),
             mlp_batched_vs_inprocess_bs32=round(r["mlp_batched_req_per_s"] / bs32, 3),
             errors=err + err2 + err3)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
