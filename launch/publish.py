"""ringserve-publish: publish a model version (full or delta) to the parameter servers, or roll back."""
from __future__ import annotations

import argparse
import json
import sys

from ringserve.client.params import ParamClient, PublishError
from ringserve.launch.logsetup import add_log_flag, configure_logging
from ringserve.launch.security import add_security_flags, security_from_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringserve-publish", description=__doc__)
    p.add_argument("--shards", required=True, help="NAME=ENDPOINT,... (the same list every role uses)")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", help="a .safetensors file (for a delta: only the changed tensors)")
    p.add_argument("--version", type=int, default=None, help="default: newest committed + 1")
    p.add_argument("--base", type=int, default=None, help="publish a delta on top of this version")
    p.add_argument("--rollback", type=int, default=None, metavar="VERSION", help="make VERSION current again")
    p.add_argument("--chunk-bytes", type=int, default=4 * 1024 * 1024, help="largest piece of one tensor")
    p.add_argument("--timeout", type=float, default=30.0)
    add_security_flags(p)
    add_log_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging("publish", args.log_level)
    with ParamClient(args.shards, args.chunk_bytes, args.timeout, security_from_args(args, "publisher")) as pc:
        try:
            if args.rollback is not None:
                pc.rollback(args.model, args.rollback)
                print(json.dumps({"model": args.model, "current": args.rollback}))
            elif args.weights:
                v = pc.publish_file(args.model, args.weights, args.version, args.base)
                print(json.dumps({"model": args.model, "version": v}))
            else:
                print(json.dumps(pc.versions(args.model)))
        except PublishError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
