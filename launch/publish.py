"""ringserve-publish: publish a model version (full or delta) to the parameter servers, make a
delta file from two checkpoints, list versions, or roll back.

  ringserve-publish --shards S --model M --weights F.safetensors          a full version
  ringserve-publish --shards S --model M --weights D.safetensors --base 3 a delta on v3
  ringserve-publish --diff OLD.safetensors NEW.safetensors --out D.safetensors
                                                                        only the tensors that changed
  ringserve-publish --shards S --model M --diff OLD NEW --base 3          publish that delta directly
  ringserve-publish --shards S --model M [--json]                        the versions, per shard
  ringserve-publish --shards S --model M --rollback 2                    make v2 current again
  ringserve-publish --shards NEW --model M --rebalance-from OLD [--wait-s 300]
                                        after a shard list change: the pieces that move, and (with
                                        --wait-s) wait until every shard holds exactly its share

A publish waits for a live worker serving the model to load the new version: one that every
such worker refuses is reverted (exit 1); --no-worker-check skips this. On a terminal (or
with --progress) it shows the bytes sent to each shard while staging.
"""
from __future__ import annotations

import argparse
import json
import sys

from safetensors.numpy import save_file
from safetensors.torch import load_file

from ringserve.client.admin import table
from ringserve.client.params import ParamClient, PublishError, changed_tensors
from ringserve.launch.cli import make_parser, parse_args
from ringserve.launch.logsetup import add_log_flag, configure_logging
from ringserve.launch.security import add_security_flags, security_from_args


def parser():
    p = make_parser("ringserve-publish", __doc__)
    p.add_argument("--shards", help="NAME=ENDPOINT,... (the same list every role uses)")
    p.add_argument("--model", help="the model's name on the shards")
    p.add_argument("--weights", help="a .safetensors file (for a delta: only the changed tensors)")
    p.add_argument("--diff", nargs=2, metavar=("OLD", "NEW"),
                   help="two .safetensors checkpoints: take only the tensors of NEW that differ from OLD")
    p.add_argument("--out", help="with --diff: write the changed tensors to this file instead of publishing")
    p.add_argument("--version", type=int, default=None, help="default: newest committed + 1")
    p.add_argument("--base", type=int, default=None, help="publish a delta on top of this version")
    p.add_argument("--allow-new-keys", action="store_true", help="a delta may add tensors its base lacks")
    p.add_argument("--allow-layout-change", action="store_true",
                   help="a full version may differ in tensors/shapes from the current one (the model changed)")
    p.add_argument("--no-worker-check", action="store_true",
                   help="do not wait for a live worker to load the new version (by default a version that every "
                        "live worker serving the model refuses is reverted and the command exits 1; use this to "
                        "publish a changed model before restarting its workers)")
    p.add_argument("--worker-check-s", type=float, default=60.0,
                   help="how long to wait for a live worker to load the new version (exit 1 if none has)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show bytes sent per shard while staging (default: when stderr is a terminal)")
    p.add_argument("--rollback", type=int, default=None, metavar="VERSION", help="make VERSION current again")
    p.add_argument("--rebalance-from", metavar="OLD_SHARDS", default=None,
                   help="the shard list before a change: print which pieces move to the --shards list and each "
                        "shard's progress (the shards, restarted with the new list, move them themselves)")
    p.add_argument("--wait-s", type=float, default=0.0, help="with --rebalance-from: wait this long for it to finish")
    p.add_argument("--list", action="store_true", help="list the model's versions per shard (the default action)")
    p.add_argument("--json", action="store_true", help="list versions as JSON instead of a table")
    p.add_argument("--chunk-bytes", type=int, default=4 * 1024 * 1024, help="largest piece of one tensor")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per shard call")
    p.add_argument("--replicas", type=int, default=None,
                   help="copies of each piece, the same for every role (default 2 with at least 2 shards, else 1)")
    p.add_argument("--write-quorum", type=int, default=None,
                   help="a version commits only when every piece is on at least this many owners (default: "
                        "--replicas); the shards missed are reported and repair themselves")
    add_security_flags(p)
    add_log_flag(p)
    return p


class Progress:
    """One line on stderr, rewritten in place: bytes sent of total, per shard (never into logs)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.shown = False  # a line is on the screen and not ended yet
        self.last = None

    def __call__(self, sent: dict[str, tuple[int, int]]) -> None:
        done = sum(a for a, _ in sent.values())
        total = sum(b for _, b in sent.values())
        parts = "  ".join(f"{n} {_mb(a)}/{_mb(b)}" for n, (a, b) in sorted(sent.items()))
        line = f"sent {_mb(done)} of {_mb(total)} MB  {parts}"
        if line != self.last:  # rewritten only when it changes
            self.stream.write("\r" + line)
            self.stream.flush()
            self.shown, self.last = True, line
        if done == total:  # every shard has it all: end the line before anything else is printed
            self.end()

    def end(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def diff(old_path: str, new_path: str) -> tuple[dict, dict]:
    """The tensors of NEW that differ from OLD, and a summary; a tensor NEW drops cannot be a delta."""
    old, new = load_file(old_path), load_file(new_path)
    dropped = sorted(set(old) - set(new))
    if dropped:
        raise PublishError(f"{new_path} lacks {len(dropped)} tensor(s) of {old_path} ({', '.join(dropped[:5])}"
                           f"{', ...' if len(dropped) > 5 else ''}): a delta can only change or add tensors; "
                           "publish NEW as a full version")
    changed = changed_tensors(new, old)
    summary = {"changed": sorted(changed), "tensors": len(new), "changed_bytes": sum(a.nbytes for a in changed.values()),
               "total_bytes": sum(t.numel() * t.element_size() for t in new.values()),
               "new_keys": sorted(set(new) - set(old))}
    return changed, summary


def versions_table(model: str, versions: dict[str, dict]) -> str:
    rows = [[shard, ",".join(map(str, v.get("versions") or [])) or "-", v.get("current") if v.get("current") is not None
             else "-", "; ".join(f"{k}: {v[k]}" for k in ("corrupt", "fallback", "repair", "error") if v.get(k)) or "-"]
            for shard, v in sorted(versions.items())]
    return "\n".join([f"model {model}", *table(["SHARD", "VERSIONS", "CURRENT", "NOTES"], rows)])


def _missed(pc: ParamClient) -> dict:
    """The shards a publish or rollback left out (they repair themselves), for the JSON line."""
    rep = pc.last_report or {}
    out = {"missed": rep.get("missed", [])}
    if rep.get("under_replicated_pieces"):
        out["under_replicated_pieces"] = rep["under_replicated_pieces"]
    if out["missed"]:
        print(f"warning: shards {', '.join(out['missed'])} missed this; they repair themselves from the other "
              f"owners", file=sys.stderr)
    return out


def _rebalance(pc: ParamClient, args) -> int:
    """Print the rebalance plan of the current version (pieces whose owner set changes) and each
    shard's progress; exit 0 once every shard holds exactly its share (at once without --wait-s)."""
    import time

    from ringserve.protocol.placement import moved_keys, parse_shards

    states, _ = pc.live()
    current = {h["current"].get(args.model) for h in states.values()} - {None}
    if len(current) != 1:
        raise PublishError(f"the shards do not agree on a current version of {args.model!r} ({sorted(current)})")
    version = current.pop()
    keys = sorted({item[0] for items in pc.manifests(args.model, version).values() for item in items})
    moved = moved_keys(keys, parse_shards(args.rebalance_from), pc.shards, pc.replicas)
    end = time.monotonic() + args.wait_s
    while True:
        st = pc.placement_status(args.model, version)
        if st["done"] or time.monotonic() >= end:
            break
        time.sleep(1.0)
    print(json.dumps({"model": args.model, "version": version, "pieces": len(keys), "pieces_moved": len(moved),
                      "pieces_moved_fraction": round(len(moved) / max(1, len(keys)), 4), **st}))
    return 0 if st["done"] else 1


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = parse_args(p, argv)
    configure_logging("publish", args.log_level)
    if args.out and not args.diff:
        p.error("--out goes with --diff")
    if not (args.diff and args.out) and not (args.shards and args.model):
        p.error("--shards and --model are needed (except for --diff OLD NEW --out FILE)")
    try:
        delta = None
        if args.diff:
            delta, summary = diff(*args.diff)
            if args.out:
                save_file({k: v for k, v in delta.items()}, args.out)
                print(json.dumps({**summary, "out": args.out}))
                return 0
            if args.base is None:
                p.error("publishing a --diff needs --base VERSION (the version OLD is)")
        show = sys.stderr.isatty() if args.progress is None else args.progress
        progress = Progress() if show else None
        checks = {"check_workers": not args.no_worker_check, "worker_check_s": args.worker_check_s,
                  "progress": progress}
        try:
            pc = ParamClient(args.shards, args.chunk_bytes, args.timeout, security_from_args(args, "publisher"),
                             replicas=args.replicas, write_quorum=args.write_quorum)
        except ValueError as exc:
            p.error(str(exc))
        with pc:
            try:
                if args.rebalance_from is not None:
                    return _rebalance(pc, args)
                if args.rollback is not None:
                    pc.rollback(args.model, args.rollback)
                    print(json.dumps({"model": args.model, "current": args.rollback, **_missed(pc)}))
                elif delta is not None:
                    v = pc.publish(args.model, delta, args.version, args.base, allow_new=args.allow_new_keys, **checks)
                    print(json.dumps({"model": args.model, "version": v, "base": args.base, **summary, **_missed(pc)}))
                elif args.weights:
                    v = pc.publish_file(args.model, args.weights, args.version, args.base,
                                        allow_new=args.allow_new_keys, allow_layout_change=args.allow_layout_change,
                                        **checks)
                    print(json.dumps({"model": args.model, "version": v, **_missed(pc)}))
                else:
                    versions = pc.versions(args.model)
                    print(json.dumps(versions) if args.json else versions_table(args.model, versions))
            finally:
                if progress is not None:
                    progress.end()
    except (PublishError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
