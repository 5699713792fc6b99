"""ringserve-ps: one parameter-server shard (durable, versioned slices of model weights)."""
from __future__ import annotations

import argparse

from ringserve.launch.logsetup import add_log_flag, configure_logging
from ringserve.launch.procs import announce
from ringserve.launch.security import add_security_flags, security_from_args
from ringserve.paramserver.shard import ShardConfig, serve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringserve-ps", description=__doc__)
    p.add_argument("--name", required=True, help="shard name: its node on the hash ring")
    p.add_argument("--data-dir", required=True, help="where committed versions are kept")
    p.add_argument("--bind", default="tcp://127.0.0.1:5600", help="command endpoint (ROUTER)")
    p.add_argument("--pub", default="tcp://127.0.0.1:*", help="announcement endpoint (PUB)")
    p.add_argument("--keep", type=int, default=3, help="committed versions kept per model")
    p.add_argument("--announce-interval", type=float, default=1.0, help="seconds between state heartbeats")
    add_security_flags(p)
    add_log_flag(p)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    configure_logging("paramserver", args.log_level)
    # A shard's key is named after the shard: workers find its public key by the ring's names.
    sec = security_from_args(args, "shard", (args.bind, args.pub), default_name=args.name)
    serve(ShardConfig(args.name, args.data_dir, args.bind, args.pub, args.keep, args.announce_interval, sec),
          announce)


if __name__ == "__main__":
    main()
