"""ringserve-master: the scheduler process (client, worker and admin ROUTER sockets)."""
from __future__ import annotations

import argparse

from ringserve.launch.cli import bind_error_exit, number, make_parser, parse_args, positive_float, positive_int
from ringserve.launch.memory import return_large_buffers_to_the_os
from ringserve.launch.logsetup import add_log_flag, configure_logging
from ringserve.launch.metrics import add_metrics_flags, metrics_access, start_metrics
from ringserve.launch.procs import announce
from ringserve.launch.security import add_security_flags, security_from_args
from ringserve.master.broker import BrokerConfig, serve
from ringserve.master.scheduler import POLICIES
from ringserve.protocol.sockets import BindError




def worker_weight(text: str) -> tuple[str, float]:
    """WORKER=W with W finite and > 0 (a NaN or zero weight would stop weighted-random dispatch)."""
    name, sep, w = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not WORKER=W")
    return name, positive_float(w)


def parser() -> argparse.ArgumentParser:
    p = make_parser("ringserve-master", __doc__)
    p.add_argument("--frontend", default="tcp://127.0.0.1:5555", help="client endpoint (MDP 0.1 clients)")
    p.add_argument("--backend", default="tcp://127.0.0.1:5556", help="worker endpoint")
    p.add_argument("--admin", default="tcp://127.0.0.1:5557", help="admin status endpoint")
    p.add_argument("--policy", default="least-outstanding", choices=sorted(POLICIES),
                   help="how a request's worker is chosen among the free ones")
    p.add_argument("--weight", action="append", default=[], metavar="WORKER=W", type=worker_weight,
                   help="weight of a worker for weighted-random (repeatable)")
    p.add_argument("--heartbeat-interval", type=positive_float, default=1.0, help="seconds between heartbeats")
    p.add_argument("--heartbeat-liveness", type=positive_int, default=3, help="missed heartbeats before eviction")
    p.add_argument("--max-queue", type=positive_int, default=1000, help="queued requests per model before OVERLOADED")
    p.add_argument("--max-attempts", type=positive_int, default=3, help="tries per request across workers")
    p.add_argument("--default-timeout", type=positive_float, default=30.0, help="seconds, for requests without one")
    p.add_argument("--drain-timeout", type=number(float, 0), default=10.0, help="seconds to finish work on SIGTERM")
    p.add_argument("--hwm", type=positive_int, default=10_000, help="ZeroMQ high-water mark per socket")
    p.add_argument("--seed", type=int, default=None, help="seed for the random policies")
    p.add_argument("--answer-cache-bytes", type=positive_int, default=64 << 20,
                   help="reply bytes kept to answer a retried request id again (oldest dropped first)")
    p.add_argument("--max-timeout", type=positive_float, default=300.0,
                   help="seconds; a client's timeout_ms is capped to this")
    p.add_argument("--state-dir", default=None,
                   help="directory where the master keeps traffic routes across restarts (default: memory only)")
    p.add_argument("--rate-limit", type=number(float, 0), default=0.0,
                   help="requests per second per client key (per connection without keys); 0: no limit")
    p.add_argument("--rate-burst", type=positive_float, default=None, help="bucket size (default: max(1, rate))")
    p.add_argument("--unavailable-grace", type=positive_float, default=10.0,
                   help="seconds a model whose last worker left stays 'unavailable' (requests queue, then get the "
                        "retryable WORKER_LOST) before it is unknown (UNKNOWN_MODEL)")
    p.add_argument("--client-batch-max", type=positive_int, default=256,
                   help="answers in one message to a client that batches (ringserve's own clients)")
    p.add_argument("--client-batch-bytes", type=positive_int, default=4 << 20,
                   help="bytes of answers in one such message (a larger answer goes in one of its own)")
    p.add_argument("--response-cache-bytes", type=number(int, 0), default=64 << 20,
                   help="bytes of answers kept for models marked cache=true (0: no response cache)")
    p.add_argument("--peers", default="",
                   help="the other active masters' admin endpoints, comma-separated: routes set on any master are "
                        "in force on all (see docs/operations.md, 'Several masters')")
    p.add_argument("--peer-interval", type=positive_float, default=0.25,
                   help="seconds between route syncs with the peers")
    add_metrics_flags(p)
    add_security_flags(p)
    add_log_flag(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse_args(parser(), argv)
    configure_logging("master", args.log_level)
    return_large_buffers_to_the_os()
    weights = dict(args.weight)
    sec = security_from_args(args, "master", (args.frontend, args.backend, args.admin))
    cfg = BrokerConfig(args.frontend, args.backend, args.admin, args.policy, weights, args.heartbeat_interval,
                       args.heartbeat_liveness, args.max_queue, args.max_attempts, args.default_timeout, args.hwm,
                       args.drain_timeout, args.seed, answer_cache_bytes=args.answer_cache_bytes,
                       max_timeout=args.max_timeout, state_dir=args.state_dir, security=sec,
                       rate_limit=args.rate_limit, rate_burst=args.rate_burst,
                       unavailable_grace=args.unavailable_grace,
                       response_cache_bytes=args.response_cache_bytes, client_batch_max=args.client_batch_max,
                       client_batch_bytes=args.client_batch_bytes,
                       peers=[e.strip() for e in args.peers.split(",") if e.strip()], peer_interval=args.peer_interval)
    try:
        serve(cfg, announce, expose=lambda registry: start_metrics(registry, args.metrics_port, args.metrics_host,
                                                                 metrics_access(args)))
    except BindError as exc:
        bind_error_exit(exc, {"--frontend": args.frontend, "--backend": args.backend, "--admin": args.admin,
                              "--metrics-port": f"http://{args.metrics_host}:{args.metrics_port}"})


if __name__ == "__main__":
    main()
