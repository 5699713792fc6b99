"""Throughput, latency and CPU per request through ringserve vs the same model in-process, and vs
a minimal Python ZeroMQ broker; prints one JSON line.

1 master, 1 worker; the load comes from separate processes (bench/loadgen.py), closed loop with
64 single-row requests in flight: the no-op model on the worker's defaults (batching on:
--max-batch-size 32 --max-queue-delay-us 0) and with batching off (`noop_bs1_*`), the MLP
256->1024->1024->10 fp32 with batching off (--max-batch-size 1, explicit, so these figures
compare with earlier runs), and the MLP with the default batching (the `mlp_batched_*` figures), beside the MLP called in-process at batch 1 and batch 32 and the minimal broker
(`zmq_limit_req_per_s`, with the CPU per round trip of its broker, echo worker and raw DEALER
clients: the floor each role's figure compares with), all in the same run. The batched MLP is also measured with
--max-queue-delay-us 2000 (`mlp_delay2ms_*`), and both at low load, 2 requests in flight
(`lowload_*`), where a queue delay is pure added latency. CPU per request is read from each
process's own counters, so it holds on a noisy machine:
  master_cpu_us_per_req / client_cpu_us_per_req   from the no-op run (defaults)
  worker_cpu_us_per_req                           no-op run: the worker's cost beyond the model
  noop_bs1_*_cpu_us_per_req                       the same with batching off
  mlp_*_cpu_us_per_req                            the same, for the MLP runs
  cache_hit_cpu_us_per_req                        the MLP marked cache=true, one input per load process:
                                                  the master's CPU per answer it gave from its cache
`--phases` runs only the named configurations (e.g. `--phases batched,noop`); the figures of the
others are left out of the line. `mlp_batched_mean_batch_size`, `_worker_queue_ms` and
`_worker_compute_ms` are the worker's own per-batch figures (admin status) for that run.
RS_LOADGEN_RUNSTATE=1 adds `noop_runnable_shares` (bench/loadgen.py: how many processes were runnable
at once during the no-op run, and each role's share). The in-process rates are the median of three slices (at the start, after the batched MLP, at the
end; `inprocess_bs32_samples_per_s_slices` lists them), so a burst of other load hits one slice.
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

from bench.common import in_process_rate  # noqa: E402
from bench.loadgen import run_load, zmq_limit  # noqa: E402
from ringserve.client.admin import AdminClient  # noqa: E402
from ringserve.launch.logsetup import configure_logging  # noqa: E402
from ringserve.launch.procs import RoleProcess, wait_for_workers  # noqa: E402
from ringserve.worker import demo  # noqa: E402

EPH = "tcp://127.0.0.1:*"
PHASES = ("limit", "noop", "noop_bs1", "mlp", "batched", "delay2", "cached", "lowload")


class Skipped(dict):
    """A configuration --phases left out: every figure NaN (arithmetic goes on), dropped from the line."""

    def __missing__(self, key):
        return float("nan")


def serve_and_measure(tmp: Path, model_arg: str, model: str, args, worker_args: list[str],
                      on_start=None) -> dict:
    """Start a master and one worker, drive load from separate processes, return figures.
    `on_start(master_pid, worker_pid)`, if given, is called once both serve, just before the load
    starts (bench/schedline.py starts its recording there)."""
    master = RoleProcess("ringserve.launch.master", ["--frontend", EPH, "--backend", EPH, "--admin", EPH,
                                                     "--log-level", "warning"], tmp / "master.log")
    worker = None
    try:
        worker = RoleProcess("ringserve.launch.worker", ["--master", master.info["backend"], "--model", model_arg,
                                                         "--device", args.device, "--log-level", "warning",
                                                         "--threads", str(os.environ.get("RS_THREADS", 1)),
                                                         *worker_args], tmp / "worker.log")
        wait_for_workers(master.info["admin"], 1, 60)
        if on_start is not None:
            on_start(master.pid, worker.pid)
        res, cpu = run_load(master.info["frontend"], model, (1, 256), args.concurrency, args.seconds,
                            processes=args.load_processes,
                            server_pids={"master": master.pid, "worker": worker.pid})
        stats = AdminClient(master.info["admin"], timeout=5.0).status()["workers"][0].get("stats", {})
    finally:
        if worker:
            worker.stop()
        master.stop()
    p50, p99 = res.percentiles_ms()
    n = max(1, res.answered)
    return {"req_per_s": round(res.rate, 1), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
            "errors": res.errors, "master_cpu_us": round(cpu["master"] / n * 1e6, 1),
            "worker_cpu_us": round(cpu["worker"] / n * 1e6, 1), "client_cpu_us": round(res.client_cpu_s / n * 1e6, 1),
            "mean_batch_size": stats.get("mean_batch_size"), "worker_queue_ms": stats.get("mean_queue_wait_ms"),
            "worker_compute_ms": stats.get("mean_compute_ms"), "runnable": res.runnable}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="measurement time per configuration")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight, over all load processes")
    p.add_argument("--load-processes", type=int, default=2, help="separate processes driving the load")
    p.add_argument("--device", default="cpu")
    p.add_argument("--phases", default=",".join(PHASES), help=f"configurations to run, of: {','.join(PHASES)}")
    args = p.parse_args(argv)
    phases = {x.strip() for x in args.phases.split(",") if x.strip()}
    if not phases or phases - set(PHASES):
        p.error(f"--phases takes some of {','.join(PHASES)}, got {args.phases!r}")

    def phase(name: str, run):
        return run() if name in phases else Skipped()
    configure_logging("bench", "warning")  # logs to stderr: stdout is the one JSON line
    torch.set_num_threads(int(os.environ.get("RS_THREADS", 1)))
    tmp = Path(tempfile.mkdtemp(prefix="rs-bench-"))
    r = {"device": args.device, "concurrency": args.concurrency, "load_processes": args.load_processes,
         "torch_threads": torch.get_num_threads()}

    dev = torch.device(args.device)
    model = demo.mlp().eval().to(dev)
    x1 = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    x32 = torch.from_numpy(np.repeat(x1, 32, axis=0))

    def call(batch):
        with torch.inference_mode():
            return model(batch.to(dev))["logits"].cpu()

    # The in-process baseline in three slices spread over the run (start, middle, end), the median
    # kept: measured once at the end it read 1,024 to 22,497 samples/s at bs32 on a shared machine.
    inproc: dict[str, list[float]] = {"bs1": [], "bs32": []}

    def inprocess_slice() -> None:
        inproc["bs1"].append(in_process_rate(lambda: call(torch.from_numpy(x1)), args.seconds / 6))
        inproc["bs32"].append(in_process_rate(lambda: call(x32), args.seconds / 6) * 32)

    inprocess_slice()
    limit = phase("limit", lambda: zmq_limit(args.seconds, args.concurrency, args.load_processes))
    noop = phase("noop", lambda: serve_and_measure(tmp, "noop=ringserve.worker.demo:noop", "noop", args, []))  # defaults
    noop1 = phase("noop_bs1", lambda: serve_and_measure(tmp, "noop=ringserve.worker.demo:noop", "noop", args,
                                                        ["--max-batch-size", "1"]))
    mlp = phase("mlp", lambda: serve_and_measure(tmp, "mlp=ringserve.worker.demo:mlp", "mlp", args,
                                                 ["--max-batch-size", "1"]))
    batched = phase("batched", lambda: serve_and_measure(tmp, "mlp=ringserve.worker.demo:mlp", "mlp", args, []))
    inprocess_slice()
    delay2 = phase("delay2", lambda: serve_and_measure(tmp, "mlp=ringserve.worker.demo:mlp", "mlp", args,
                                                       ["--max-queue-delay-us", "2000"]))
    # Each load process sends one input over and over: after the first, the master answers from its cache.
    cached = phase("cached", lambda: serve_and_measure(tmp, "mlp=ringserve.worker.demo:mlp,cache=true", "mlp", args, []))
    low = argparse.Namespace(**{**vars(args), "concurrency": 2, "load_processes": 2})
    low_default = phase("lowload", lambda: serve_and_measure(tmp, "mlp=ringserve.worker.demo:mlp", "mlp", low, []))
    low_delay2 = phase("lowload", lambda: serve_and_measure(tmp, "mlp=ringserve.worker.demo:mlp", "mlp", low,
                                                            ["--max-queue-delay-us", "2000"]))

    inprocess_slice()
    bs1, bs32 = (float(np.median(inproc[k])) for k in ("bs1", "bs32"))
    r["inprocess_bs32_samples_per_s_slices"] = [round(v, 1) for v in inproc["bs32"]]
    r.update(zmq_limit_req_per_s=round(limit["req_per_s"], 1),
             zmq_limit_broker_cpu_us_per_req=round(limit["broker_cpu_us"], 1),
             zmq_limit_worker_cpu_us_per_req=round(limit["worker_cpu_us"], 1),
             zmq_limit_client_cpu_us_per_req=round(limit["client_cpu_us"], 1),
             noop_req_per_s=noop["req_per_s"], noop_p50_ms=noop["p50_ms"], noop_p99_ms=noop["p99_ms"],
             noop_vs_zmq_limit=round(noop["req_per_s"] / limit["req_per_s"], 3),
             master_cpu_us_per_req=noop["master_cpu_us"], worker_cpu_us_per_req=noop["worker_cpu_us"],
             client_cpu_us_per_req=noop["client_cpu_us"],
             noop_bs1_req_per_s=noop1["req_per_s"], noop_bs1_p99_ms=noop1["p99_ms"],
             noop_bs1_master_cpu_us_per_req=noop1["master_cpu_us"],
             noop_bs1_worker_cpu_us_per_req=noop1["worker_cpu_us"],
             noop_bs1_client_cpu_us_per_req=noop1["client_cpu_us"],
             mlp_req_per_s=mlp["req_per_s"], mlp_p50_ms=mlp["p50_ms"], mlp_p99_ms=mlp["p99_ms"],
             mlp_master_cpu_us_per_req=mlp["master_cpu_us"], mlp_worker_cpu_us_per_req=mlp["worker_cpu_us"],
             mlp_worker_overhead_us_per_req=round(mlp["worker_cpu_us"] - 1e6 / bs1, 1),
             mlp_batched_req_per_s=batched["req_per_s"], mlp_batched_p50_ms=batched["p50_ms"],
             mlp_batched_p99_ms=batched["p99_ms"], mlp_batched_master_cpu_us_per_req=batched["master_cpu_us"],
             mlp_batched_worker_cpu_us_per_req=batched["worker_cpu_us"],
             mlp_batched_mean_batch_size=batched["mean_batch_size"], mlp_batched_worker_queue_ms=batched["worker_queue_ms"],
             mlp_batched_worker_compute_ms=batched["worker_compute_ms"],
             mlp_delay2ms_req_per_s=delay2["req_per_s"], mlp_delay2ms_p50_ms=delay2["p50_ms"],
             mlp_delay2ms_p99_ms=delay2["p99_ms"],
             lowload_default_req_per_s=low_default["req_per_s"], lowload_default_p50_ms=low_default["p50_ms"],
             lowload_default_p99_ms=low_default["p99_ms"],
             lowload_delay2ms_req_per_s=low_delay2["req_per_s"], lowload_delay2ms_p50_ms=low_delay2["p50_ms"],
             lowload_delay2ms_p99_ms=low_delay2["p99_ms"],
             cache_hit_req_per_s=cached["req_per_s"], cache_hit_p99_ms=cached["p99_ms"],
             cache_hit_cpu_us_per_req=cached["master_cpu_us"],
             inprocess_bs1_req_per_s=round(bs1, 1), inprocess_bs32_samples_per_s=round(bs32, 1),
             mlp_vs_inprocess_bs1=round(mlp["req_per_s"] / bs1, 3),
             mlp_batched_vs_inprocess_bs1=round(batched["req_per_s"] / bs1, 3),
             mlp_batched_vs_inprocess_bs32=round(batched["req_per_s"] / bs32, 3),
             errors=sum(x["errors"] for x in (noop, noop1, mlp, batched, delay2, cached, low_default, low_delay2)
                        if not isinstance(x, Skipped)))
    if noop.get("runnable"):  # RS_LOADGEN_RUNSTATE=1 (bench/loadgen.py): do the stages overlap?
        r["noop_runnable_shares"] = noop["runnable"]
    print(json.dumps({k: v for k, v in r.items() if not (isinstance(v, float) and v != v)}))  # NaN: not run


if __name__ == "__main__":
    main()
