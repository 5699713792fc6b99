"""ringserve-master: the scheduler process (client, worker and admin ROUTER sockets)."""
from __future__ import annotations

import argparse

from ringserve.launch.logsetup import add_log_flag, configure_logging
from ringserve.launch.procs import announce
from ringserve.launch.security import add_security_flags, security_from_args
from ringserve.master.broker import BrokerConfig, serve
from ringserve.master.scheduler import POLICIES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringserve-master", description=__doc__)
    p.add_argument("--frontend", default="tcp://127.0.0.1:5555", help="client endpoint (MDP 0.1 clients)")
    p.add_argument("--backend", default="tcp://127.0.0.1:5556", help="worker endpoint")
    p.add_argument("--admin", default="tcp://127.0.0.1:5557", help="admin status endpoint")
    p.add_argument("--policy", default="least-outstanding", choices=sorted(POLICIES))
    p.add_argument("--weight", action="append", default=[], metavar="WORKER=W",
                   help="weight of a worker for weighted-random (repeatable)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    p.add_argument("--heartbeat-liveness", type=int, default=3, help="missed heartbeats before eviction")
    p.add_argument("--max-queue", type=int, default=1000, help="queued requests per model before OVERLOADED")
    p.add_argument("--max-attempts", type=int, default=3, help="tries per request across workers")
    p.add_argument("--default-timeout", type=float, default=30.0, help="seconds, for requests without one")
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to finish work on SIGTERM")
    p.add_argument("--hwm", type=int, default=10_000, help="ZeroMQ high-water mark per socket")
    p.add_argument("--seed", type=int, default=None, help="seed for the random policies")
    p.add_argument("--rate-limit", type=float, default=0.0,
                   help="requests per second per client key (per connection without keys); 0: no limit")
    p.add_argument("--rate-burst", type=float, default=None, help="bucket size (default: max(1, rate))")
    add_security_flags(p)
    add_log_flag(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    configure_logging("master", args.log_level)
    weights = {}
    for item in args.weight:
        name, _, w = item.partition("=")
        weights[name] = float(w)
    sec = security_from_args(args, "master", (args.frontend, args.backend, args.admin))
    cfg = BrokerConfig(args.frontend, args.backend, args.admin, args.policy, weights, args.heartbeat_interval,
                       args.heartbeat_liveness, args.max_queue, args.max_attempts, args.default_timeout, args.hwm,
                       args.drain_timeout, args.seed, sec, args.rate_limit, args.rate_burst)
    serve(cfg, announce)


if __name__ == "__main__":
    main()
