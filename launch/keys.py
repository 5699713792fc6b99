"""ringserve-keys: make, list and revoke CURVE key pairs per identity in a keys directory.

    ringserve-keys DIR new ROLE NAME [NAME...]   a key pair per name (secret file 0600)
    ringserve-keys DIR revoke ROLE NAME           peers stop accepting it within a second, no restart
    ringserve-keys DIR list                       public keys by role

Roles: client, worker, admin, publisher, shard, master. Peers need only public/; each process
needs its own secret/ROLE/NAME.key_secret. See docs/security.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from ringserve.protocol.security import ROLES, SecurityError, create_identity, list_identities, revoke_identity


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringserve-keys", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="the keys directory")
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="make key pairs")
    new.add_argument("role", choices=ROLES)
    new.add_argument("names", nargs="+")
    rv = sub.add_parser("revoke", help="remove a key pair (public and secret)")
    rv.add_argument("role", choices=ROLES)
    rv.add_argument("name")
    sub.add_parser("list", help="public keys by role")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "new":
            for name in args.names:
                pub, sec = create_identity(args.dir, args.role, name)
                print(json.dumps({"role": args.role, "name": name, "public": str(pub), "secret": str(sec)}))
        elif args.command == "revoke":
            if not revoke_identity(args.dir, args.role, args.name):
                print(f"error: no key {args.role}:{args.name} in {args.dir}", file=sys.stderr)
                return 1
            print(json.dumps({"revoked": f"{args.role}:{args.name}"}))
        else:
            print(json.dumps(list_identities(args.dir)))
    except SecurityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
