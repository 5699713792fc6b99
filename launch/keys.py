"""ringserve-keys: make, list and revoke CURVE key pairs per identity in a keys directory.

    ringserve-keys DIR new ROLE NAME [NAME...]   a key pair per name (secret file 0600)
    ringserve-keys DIR revoke ROLE NAME           peers stop accepting it within a second, no restart
    ringserve-keys DIR list                       public keys by role

DIR may also come from --keys DIR or a config file's `keys = "DIR"` (the same setting every
role's --keys reads), e.g. `ringserve-keys --config ~/ringserve.toml list`.
Roles: client, worker, admin, publisher, shard, master. Peers need only public/; each process
needs its own secret/ROLE/NAME.key_secret. See docs/security.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ringserve.launch.cli import HelpFormatter, make_parser, parse_args
from ringserve.protocol.security import ROLES, SecurityError, create_identity, list_identities, revoke_identity

COMMANDS = ("new", "revoke", "list")
_TAKES_VALUE = ("--config", "--keys")  # top-level options whose value is the next word


def parser() -> argparse.ArgumentParser:
    p = make_parser("ringserve-keys", __doc__)
    p.add_argument("--keys", metavar="DIR", default=None,
                   help="the keys directory (or give it as the first word, before the command)")
    sub = p.add_subparsers(dest="command", required=True, prog="ringserve-keys DIR")
    p.usage = "ringserve-keys [-h] [--config FILE.toml] [--keys DIR | DIR] {new,revoke,list} ..."
    new = sub.add_parser("new", formatter_class=HelpFormatter, help="make key pairs")
    new.add_argument("role", choices=ROLES, help="the role the keys are for")
    new.add_argument("names", nargs="+", metavar="NAME", help="one key pair per name")
    rv = sub.add_parser("revoke", formatter_class=HelpFormatter, help="remove a key pair (public and secret)")
    rv.add_argument("role", choices=ROLES, help="the key's role")
    rv.add_argument("name", help="the key's name")
    sub.add_parser("list", formatter_class=HelpFormatter, help="public keys by role")
    return p


def dir_first(argv: list[str]) -> list[str]:
    """`ringserve-keys DIR CMD ...` -> `ringserve-keys --keys DIR CMD ...` (a positional DIR
    before the subcommand cannot be told from it by argparse)."""
    k = 0
    while k < len(argv):
        word = argv[k]
        if word == "--":
            return argv
        if word in _TAKES_VALUE:
            k += 2
            continue
        if word.startswith("-"):
            k += 1
            continue
        if word in COMMANDS:
            return argv
        return [*argv[:k], "--keys", word, *argv[k + 1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = parse_args(p, dir_first(list(sys.argv[1:] if argv is None else argv)))
    if not args.keys:
        p.error("which keys directory? give DIR (ringserve-keys DIR list), --keys DIR, or keys = \"DIR\" in --config")
    if args.command != "new" and not Path(args.keys).is_dir():
        print(f"error: no keys directory {args.keys}", file=sys.stderr)
        return 1
    try:
        if args.command == "new":
            for name in args.names:
                pub, sec = create_identity(args.keys, args.role, name)
                print(json.dumps({"role": args.role, "name": name, "public": str(pub), "secret": str(sec)}))
        elif args.command == "revoke":
            if not revoke_identity(args.keys, args.role, args.name):
                print(f"error: no key {args.role}:{args.name} in {args.keys}", file=sys.stderr)
                return 1
            print(json.dumps({"revoked": f"{args.role}:{args.name}"}))
        else:
            print(json.dumps(list_identities(args.keys)))
    except (SecurityError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
