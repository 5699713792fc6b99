"""ringserve-admin: ask the master for its status, or drain a worker."""
from __future__ import annotations

import argparse
import json
import sys

from ringserve.client.admin import AdminClient, format_status
from ringserve.launch.security import add_security_flags, security_from_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringserve-admin", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="workers, models, queues and counters")
    st.add_argument("--master", default="tcp://127.0.0.1:5557", help="the master's admin endpoint")
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")
    dr = sub.add_parser("drain", help="stop sending work to a worker; it finishes and leaves")
    dr.add_argument("worker", help="worker name (as in status)")
    dr.add_argument("--master", default="tcp://127.0.0.1:5557")
    rb = sub.add_parser("rollback", help="make an earlier committed version current; workers swap back")
    rb.add_argument("--shards", required=True, help="NAME=ENDPOINT,... of the parameter servers")
    rb.add_argument("--model", required=True)
    rb.add_argument("--version", type=int, required=True)
    for sp in (st, dr, rb):  # status/drain use an admin key, rollback a publisher key
        add_security_flags(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "rollback":
        from ringserve.client.params import ParamClient, PublishError

        with ParamClient(args.shards, timeout=10, security=security_from_args(args, "publisher")) as pc:
            try:
                pc.rollback(args.model, args.version)
            except PublishError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        print(json.dumps({"model": args.model, "current": args.version}))
        return 0
    admin = AdminClient(args.master, security=security_from_args(args, "admin"))
    try:
        if args.command == "status":
            st = admin.status()
            print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
        elif args.command == "drain":
            print(json.dumps(admin.drain(args.worker)))
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
