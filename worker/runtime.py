"""Assemble a worker from its flags: load the models, build the agent (and the weight sync)."""
from __future__ import annotations

import os
import sys

import torch

from ringserve.worker.agent import WorkerAgent, WorkerConfig
from ringserve.protocol.placement import parse_shards
from ringserve.worker.sync import WeightSync
from ringserve.protocol.security import Security
from ringserve.worker.loader import ServedModel, parse_model_arg, pick_device


# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The
# compute thread lets go of the GIL in every torch op and must get it back for the next one;
# while the socket thread or a stage thread runs Python, each of those waits could last the
# whole interval. A small model's batch (bench/text.py --size tiny: a 2-layer BERT, batches of
# 8) took 12.2-12.3 ms of compute with 5 ms and 10.4-11.2 ms with 0.5-1 ms.
GIL_SWITCH_INTERVAL_S = 0.001


def build_worker(args, security: Security | None = None) -> WorkerAgent:
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    device = pick_device(args.device)
    defaults = {"dtype": args.dtype, "quantize": args.quantize, "keep": args.keep_versions}
    models = {}
    for text in args.model:
        opts = parse_model_arg(text, defaults)
        models[opts.name] = ServedModel(opts, device, wait_for_weights=bool(args.paramservers) and not opts.weights,
                                        on_demand=bool(args.max_models))
    security = security or Security()
    # With keys the master registers a worker under its key's name, so that is its default name too.
    name = args.name or (security.own_name() if security.enabled else f"worker-{os.getpid()}")
    cfg = WorkerConfig(master=args.master, name=name,
                       heartbeat_interval=args.heartbeat_interval, heartbeat_liveness=args.heartbeat_liveness,
                       max_backoff=args.max_backoff, max_batch_size=args.max_batch_size,
                       max_queue_delay_s=args.max_queue_delay_us / 1e6,
                       batch_idle_gap_s=None if args.batch_idle_us is None else args.batch_idle_us / 1e6, credit=args.credit, weight=args.weight,
                       max_models=args.max_models, security=security,
                       compute_stall_s=args.compute_stall_s)
    agent = WorkerAgent(cfg, models)
    agent.compute.stage_threads = getattr(args, "stage_threads", 2)  # the stage pool starts with the compute thread
    if args.paramservers:
        agent.sync = WeightSync(agent.ctx, parse_shards(args.paramservers), models, agent.compute.swaps,
                                security=cfg.security, wake=agent.compute.wake,
                                replicas=getattr(args, "replicas", None),
                                prefetch=not getattr(args, "no_prefetch", False))
    return agent
