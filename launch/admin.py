"""ringserve-admin: the master's status, draining a worker, traffic splits between versions, and
rollback of a model to an earlier version on the parameter servers."""
from __future__ import annotations

import argparse
import json
import sys

from ringserve.client.admin import AdminClient, format_status
from ringserve.launch.cli import HelpFormatter, make_parser, parse_args
from ringserve.launch.security import add_security_flags, security_from_args


MASTER_HELP = "the master's admin endpoint (several active masters: comma-separated)"


def parser() -> argparse.ArgumentParser:
    p = make_parser("ringserve-admin", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", formatter_class=HelpFormatter, help="workers, models, queues and counters")
    st.add_argument("--master", default="tcp://127.0.0.1:5557", help=MASTER_HELP)
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")
    dr = sub.add_parser("drain", formatter_class=HelpFormatter, help="stop sending work to a worker; it finishes and leaves")
    dr.add_argument("worker", help="worker name (as in status)")
    dr.add_argument("--master", default="tcp://127.0.0.1:5557", help=MASTER_HELP)
    rt = sub.add_parser("route", formatter_class=HelpFormatter, help="split a model's traffic between versions (canary, A/B, shadow)",
                        description="Examples: --split 3=90,4=10 (canary); --split 3=50,4=50 --sticky-key user "
                                    "(A/B: a request's tags['user'] keeps one version); --shadow 4 (mirror a "
                                    "copy, answers discarded); --promote 4; --clear. A pinned version wins.")
    rt.add_argument("--model", required=True, help="the model whose traffic is split")
    what = rt.add_mutually_exclusive_group(required=True)
    what.add_argument("--split", metavar="VERSION=PERCENT,...", help="percentages per version, summing to 100")
    what.add_argument("--promote", type=int, metavar="VERSION", help="send all traffic to VERSION; ends the split")
    what.add_argument("--clear", action="store_true", help="remove the route (requests go to any version)")
    rt.add_argument("--sticky-key", metavar="TAG", help="a request tag that keeps its value on one version")
    rt.add_argument("--shadow", type=int, metavar="VERSION", help="mirror a copy of traffic to VERSION")
    rt.add_argument("--master", default="tcp://127.0.0.1:5557", help=MASTER_HELP)
    rb = sub.add_parser("rollback", formatter_class=HelpFormatter, help="make an earlier committed version current; workers swap back")
    rb.add_argument("--shards", required=True, help="NAME=ENDPOINT,... of the parameter servers")
    rb.add_argument("--model", required=True, help="the model's name on the shards")
    rb.add_argument("--version", type=int, required=True, help="the committed version to make current again")
    rb.add_argument("--replicas", type=int, default=None,
                    help="copies of each piece, as every role uses (default 2 with at least 2 shards)")
    rb.add_argument("--write-quorum", type=int, default=None,
                    help="refuse a version with a piece on fewer owners than this (default: --replicas)")
    for sp in (st, dr, rt, rb):  # status/drain/route use an admin key, rollback a publisher key
        add_security_flags(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_args(parser(), argv)
    if args.command == "rollback":
        from ringserve.client.params import ParamClient, PublishError

        with ParamClient(args.shards, timeout=10, security=security_from_args(args, "publisher"),
                         replicas=args.replicas, write_quorum=args.write_quorum) as pc:
            try:
                pc.rollback(args.model, args.version)
            except PublishError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        print(json.dumps({"model": args.model, "current": args.version}))
        return 0
    security = security_from_args(args, "admin")
    masters = [m.strip() for m in args.master.split(",") if m.strip()]  # several: an active-active set
    try:
        if args.command == "status":
            if len(masters) == 1:
                st = AdminClient(masters[0], security=security).status()
                print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
                return 0
            failed = 0
            every = {}
            for m in masters:  # each master's own view: its workers, its clients' queues, its peers
                try:
                    every[m] = AdminClient(m, security=security).status()
                except TimeoutError as exc:
                    every[m], failed = {"ok": False, "error": str(exc)}, failed + 1
            if args.json:
                print(json.dumps({"masters": every}, indent=2, default=str))
            else:
                for m, st in every.items():
                    print(f"== master {m}")
                    print(format_status(st) if st.get("ok") else f"error: {st['error']}")
            return 1 if failed == len(masters) else 0
        if args.command == "drain":  # a worker is registered with every master: drain it on each
            replies = {}
            for m in masters:
                try:
                    replies[m] = AdminClient(m, security=security).drain(args.worker)
                except TimeoutError as exc:
                    replies[m] = {"ok": False, "error": str(exc)}
            print(json.dumps(replies[masters[0]] if len(masters) == 1 else replies))
            return 0 if any(r.get("ok") for r in replies.values()) else 1
        # A route is set on the first master that answers (AdminClient tries each in turn); its peers
        # take it within --peer-interval.
        reply = AdminClient(args.master, security=security).route(args.model, args.split, args.sticky_key,
                                                                  args.shadow, args.promote, args.clear)
        print(json.dumps(reply))
        return 0 if reply.get("ok") else 1  # a refused route (a bad split) is a failure
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
