"""ringserve-ps: one parameter-server shard (durable, versioned slices of model weights)."""
from __future__ import annotations

import argparse

from ringserve.launch.cli import bind_error_exit, make_parser, parse_args
from ringserve.launch.memory import keep_piece_buffers
from ringserve.launch.logsetup import add_log_flag, configure_logging
from ringserve.launch.metrics import add_metrics_flags, metrics_access, start_metrics
from ringserve.launch.procs import announce
from ringserve.launch.security import add_security_flags, security_from_args
from ringserve.paramserver.repair import FULL_CHECK_S
from ringserve.paramserver.shard import DURABILITY, ShardConfig, serve
from ringserve.protocol.placement import parse_shards, resolve_replicas
from ringserve.protocol.sockets import BindError


def parser() -> argparse.ArgumentParser:
    p = make_parser("ringserve-ps", __doc__)
    p.add_argument("--name", required=True, help="shard name: its node on the hash ring")
    p.add_argument("--data-dir", required=True, help="where committed versions are kept")
    p.add_argument("--bind", default="tcp://127.0.0.1:5600", help="command endpoint (ROUTER)")
    p.add_argument("--pub", default="tcp://127.0.0.1:*", help="announcement endpoint (PUB)")
    p.add_argument("--keep", type=int, default=3, help="committed versions kept per model")
    p.add_argument("--announce-interval", type=float, default=1.0, help="seconds between state heartbeats")
    p.add_argument("--max-staging-mb", type=float, default=2048.0,
                   help="staged (uncommitted) data held at most, all publishers together; beyond it OVERLOADED")
    p.add_argument("--staging-ttl", type=float, default=600.0,
                   help="seconds a staged version waits for its commit before it is dropped")
    p.add_argument("--shards", default=None,
                   help="NAME=ENDPOINT,... the ring's whole shard list (the same every role uses): with it the "
                        "shard checks that clients agree on the ring and --replicas, and repairs itself from "
                        "the other owners of its pieces")
    p.add_argument("--replicas", type=int, default=None,
                   help="copies of each piece (default 2 with at least 2 shards in --shards, else 1)")
    p.add_argument("--repair-interval", type=float, default=2.0,
                   help="seconds between repair rounds (0: no repair)")
    p.add_argument("--full-check-interval", type=float, default=FULL_CHECK_S,
                   help="seconds between repair's full comparisons with the other owners (what a shard list "
                        "change rebalances by)")
    p.add_argument("--repair-mbps", type=float, default=0.0,
                   help="repair traffic at most this many MB/s (0: unbounded)")
    p.add_argument("--durability", choices=DURABILITY, default="fsync",
                   help="when a stage's pieces count as stored: fsync (each shard fsyncs them before it answers the "
                        "stage, so a commit survives a power loss of every owner) or replicated (written to the page "
                        "cache only: a commit survives a crash of any shard process, and a power loss of fewer than "
                        "the W owners that committed it, whose pieces are checked at start and repaired from the "
                        "others; docs/operations.md)")
    add_metrics_flags(p)
    add_security_flags(p)
    add_log_flag(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parse_args(parser(), argv)
    configure_logging("paramserver", args.log_level)
    keep_piece_buffers()
    # A shard's key is named after the shard: workers find its public key by the ring's names.
    sec = security_from_args(args, "shard", (args.bind, args.pub), default_name=args.name)
    try:
        shards = parse_shards(args.shards) if args.shards else None
        if shards is not None:
            resolve_replicas(args.replicas, len(shards))
            if args.name not in shards:
                raise ValueError(f"--name {args.name} is not in --shards")
        elif args.replicas is not None and args.replicas < 1:
            raise ValueError("--replicas must be a positive integer")
    except ValueError as exc:
        parser().error(str(exc))
    try:
        serve(ShardConfig(args.name, args.data_dir, args.bind, args.pub, args.keep, args.announce_interval,
                          max_staging_bytes=int(args.max_staging_mb * 1024 * 1024), staging_ttl=args.staging_ttl,
                          security=sec, shards=shards, replicas=args.replicas, repair_interval=args.repair_interval,
                          repair_bytes_per_s=args.repair_mbps * 1e6,
                          full_check_interval=args.full_check_interval, durability=args.durability),
              announce, expose=lambda registry: start_metrics(registry, args.metrics_port, args.metrics_host,
                                                              metrics_access(args)))
    except BindError as exc:
        bind_error_exit(exc, {"--bind": args.bind, "--pub": args.pub,
                              "--metrics-port": f"http://{args.metrics_host}:{args.metrics_port}"})


if __name__ == "__main__":
    main()
