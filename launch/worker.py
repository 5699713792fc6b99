"""ringserve-worker: runs models for a master (CUDA when available, else CPU).

With --device all-gpus it starts one worker process per visible GPU (one on CPU if none).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import structlog

from ringserve.launch.cli import make_parser, number, parse_args, positive_float, positive_int
from ringserve.launch.memory import keep_compute_buffers
from ringserve.launch.logsetup import add_log_flag, configure_logging
from ringserve.launch.metrics import add_metrics_flags, metrics_access, start_metrics
from ringserve.launch.security import add_security_flags, security_from_args


def parser() -> argparse.ArgumentParser:
    p = make_parser("ringserve-worker", __doc__)
    p.add_argument("--master", default="tcp://127.0.0.1:5556",
                   help="the master's worker endpoint; several (active masters), comma-separated: the worker "
                        "registers with each and splits its credit between them")
    p.add_argument("--model", action="append", required=True,
                   metavar="NAME=MODULE:FACTORY[,weights=F][,dtype=D][,quantize=int8][,max_batch=N][,arg.K=V]",
                   help="a model to serve (repeatable); max_batch=N sets its rows per batch (1: never batched)")
    p.add_argument("--name", default=None, help="worker name shown in status (default worker-PID)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | all-gpus")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="default precision for models that do not set dtype=")
    p.add_argument("--quantize", default=None, choices=["int8"], help="default dynamic quantization (CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice, one per core; several workers on one "
                        "host should split the cores between them)")
    p.add_argument("--max-batch-size", type=positive_int, default=32,
                   help="rows per batch (dynamic batching; per model: max_batch=N); 1 turns batching off. A batch "
                        "holds what queued while the previous one ran, so batching adds no wait at low load")
    p.add_argument("--max-queue-delay-us", type=number(float, 0), default=0.0,
                   help="longest wait for a batch to fill, from the oldest request's arrival (0: never wait, "
                        "batch only what has arrived)")
    p.add_argument("--batch-idle-us", type=number(float, 0), default=None,
                   help="run a batch that has received nothing new for this long, even before --max-queue-delay-us "
                        "(unset: wait the whole delay)")
    p.add_argument("--credit", type=int, default=None,
                   help="requests in flight (default 2 x batch size, >= 4: 64 with the default batch size)")
    p.add_argument("--weight", type=positive_float, default=1.0, help="weight for the weighted-random policy")
    p.add_argument("--heartbeat-interval", type=positive_float, default=1.0,
                   help="seconds between heartbeats to the master (use the master's value)")
    p.add_argument("--heartbeat-liveness", type=positive_int, default=3,
                   help="missed master heartbeats before the worker reconnects")
    p.add_argument("--max-backoff", type=float, default=32.0, help="longest reconnect backoff, seconds")
    p.add_argument("--keep-versions", type=int, default=1, choices=range(1, 17), metavar="N",
                   help="versions of each model kept loaded side by side (current + N-1 earlier), so requests "
                        "pinned or routed to an earlier version are served during a canary or A/B split "
                        "(per model: keep=N)")
    p.add_argument("--max-models", type=number(int, 0), default=0, metavar="N",
                   help="load models on their first request (from the parameter servers) and keep at most N "
                        "loaded, unloading the least recently used (0: every --model stays loaded)")
    p.add_argument("--compute-stall-s", type=positive_float, default=300.0,
                   help="leave (DISCONNECT, exit 1) if one batch runs longer than this, so the master "
                        "requeues its work")
    p.add_argument("--stage-threads", type=positive_int, default=2,
                   help="threads running models' preprocess/postprocess stages, beside the compute thread")
    p.add_argument("--paramservers", default=None,
                   help="NAME=ENDPOINT,... of the parameter-server shards to take weights from")
    p.add_argument("--replicas", type=int, default=None,
                   help="copies of each piece on the shards, as every role uses (default 2 with at least 2 shards)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="fetch a new version only once the shards commit it, not while they write its stage "
                        "(the sync then starts at the commit; nothing unserved is held meanwhile)")
    add_metrics_flags(p)
    add_security_flags(p)
    add_log_flag(p)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = parse_args(p, argv)
    if args.max_models and not args.paramservers:
        p.error("--max-models needs --paramservers (models load from the shards)")
    if args.paramservers:
        from ringserve.protocol.placement import parse_shards, resolve_replicas
        try:
            resolve_replicas(args.replicas, len(parse_shards(args.paramservers)))
        except ValueError as exc:
            p.error(str(exc))
    configure_logging("worker", args.log_level)
    keep_compute_buffers()
    if args.device == "all-gpus":
        sys.exit(_one_per_gpu(argv if argv is not None else sys.argv[1:], args.metrics_port))
    log = structlog.get_logger("ringserve.worker")
    log.info("worker_starting", pid=os.getpid(), models=[m.split("=", 1)[0] for m in args.model],
             device=args.device, paramservers=bool(args.paramservers))
    from ringserve.launch.procs import announce
    from ringserve.worker.runtime import build_worker

    from ringserve.worker.loader import ModelLoadError

    try:
        agent = build_worker(args, security_from_args(args, "worker"))
    except (ModelLoadError, ValueError) as exc:  # a bad --model: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    agent.install_signal_handlers()
    url = start_metrics(agent.metrics.registry, args.metrics_port, args.metrics_host,
                        metrics_access(args))
    announce({"role": "worker", "pid": os.getpid(), "name": agent.cfg.name, "metrics": url})
    if args.paramservers and any(not m.ready for m in agent.models.values()):
        log.info("worker_waiting_for_weights", models=sorted(n for n, m in agent.models.items() if not m.ready),
                 paramservers=args.paramservers)
    agent.run()
    exit_now(1 if agent.failed else 0)


def exit_now(status: int) -> None:
    """Leave at once once the work is done (sockets closed, replies sent, logs written).

    The interpreter's own teardown after that (finalizing torch's modules and whatever the
    model's code holds) took ~0.4 s on an idle machine and seconds on a loaded one, while
    nothing was left to do: so flush what we wrote and _exit, as the worker's threads (all
    daemons, their sockets closed) need no goodbye."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _one_per_gpu(argv: list[str], metrics_port: int | None) -> int:
    """One worker per GPU; the k-th serves its metrics on --metrics-port + k (the same port twice cannot bind)."""
    import torch

    count = torch.cuda.device_count()
    devices = [f"cuda:{i}" for i in range(count)] or ["cpu"]
    base = [a for a in argv if a != "all-gpus" and a != "--device"]

    def port(k: int) -> list[str]:  # flags given last win over earlier ones and over --config
        return ["--metrics-port", str(metrics_port + k)] if metrics_port else []

    from ringserve.launch.procs import popen_tied

    # tied: SIGKILL of this launcher takes its workers down too (launch/lifeline.py)
    children = [popen_tied("ringserve.launch.worker", [*base, "--device", d, *port(k)])[0]
                for k, d in enumerate(devices)]
    structlog.get_logger("ringserve.worker").info("started_per_gpu_workers", devices=devices)

    def forward(signum, _frame):
        for c in children:
            c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(c.wait() for c in children)


if __name__ == "__main__":
    main()
