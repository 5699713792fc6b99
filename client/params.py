"""Publishing model weights to the parameter servers (two-phase: stage everywhere, then commit).

A version becomes visible only when every shard has committed it: workers switch only when
all shards announce the same current version.

Before anything is staged the new version is checked against the model's layout (sent with the
shards' hellos, `layout_of`; read from their manifests when too few hellos carry it): a delta
against its base (same shapes and dtypes; new tensors only with `allow_new`), a full version
against the current one (refused if it would leave the model unloadable, unless
`allow_layout_change`). After staging, the shards' replies must tile every tensor exactly, or
nothing is committed. Stages carry a random publisher token and a content digest: the commit
goes first to one arbiter shard (the first by name), so of two publishers racing for one
version number exactly one wins and the other gets CONFLICT having committed nothing. If a
commit fails anywhere, every shard is told to revert this publish (its digest), including
shards that did not answer, so a late commit is undone too and the shards agree again.
Then (unless told not to) the publisher waits for a live worker following the model to build
the version, from the follower reports workers leave with the shards: one that every such
worker refuses is reverted the same way and the publish fails (`PublishRefused`).

Replicated shards (issue 20): each piece is staged on its R owners (protocol/placement.py),
and a version commits only when every piece is staged, then committed, on at least W owners
(`write_quorum`, default R): a shard that is down or fails is left out and named in
`last_report["missed"]`; fewer than W owners of some piece and nothing is committed (or what
was is reverted). Every shard's hello must report the same R and shard list, or the client
refuses to go on (RingMismatch). Each commit, rollback and revert carries an epoch (the time
in ns): a shard that missed it adopts the newest one from the other owners (repair).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import structlog
import zmq
from safetensors.numpy import load_file

from ringserve.client.errors import Conflict
from ringserve.protocol.digest import DEFAULT as PIECE_DIGEST, checksum as piece_checksum
from ringserve.protocol.codec import to_numpy
from ringserve.protocol.placement import (DEFAULT_CHUNK_BYTES, fingerprint, min_live, model_name_problem, owners,
                                          parse_shards, place, plan, quorum_problem, resolve_replicas, ring,
                                          ring_problem)
from ringserve.protocol.security import Security
from ringserve.protocol.shardrpc import ShardCallError, ShardRPC

log = structlog.get_logger("ringserve.publish")

HASH_THREADS = min(4, os.cpu_count() or 1)  # threads hashing the pieces of a publish
WORKER_CHECK_S = 60.0  # how long a publish waits for a live worker to load what it committed
WORKER_CHECK_POLL_FIRST_S, WORKER_CHECK_POLL_MAX_S = 0.005, 0.1  # its polls of the shards: 5 ms, doubling to 100 ms


class PublishError(RuntimeError):
    pass


class RingMismatch(PublishError):
    """A shard uses another replica count or shard list than this client: they would disagree on
    where pieces live."""


class PublishRefused(PublishError):
    """Every live worker that serves the model refused the version; it was reverted."""


class PublishConflict(PublishError, Conflict):
    """The version number is taken by other content (another publisher won); nothing of ours is served."""

    def __init__(self, message: str):
        Conflict.__init__(self, message)  # "CONFLICT: ...", with .code and .message


Layout = dict[str, tuple[str, tuple[int, ...]]]  # tensor -> (dtype, shape)


def layout_problem(new: Layout, ref: Layout, delta: bool, allow_new: bool) -> str | None:
    """Why `new` cannot replace (full) or update (delta) a version laid out as `ref`; None if it can.
    A pure function: both the delta check and the "would leave the model unloadable" check."""
    problems = []
    for name in sorted(new):
        if name not in ref:
            if not allow_new:
                problems.append(f"{name}: not in the {'base' if delta else 'current version'}")
        elif new[name] != ref[name]:
            problems.append(f"{name}: {new[name][0]}{list(new[name][1])}, "
                            f"{'base' if delta else 'current version'} has {ref[name][0]}{list(ref[name][1])}")
    if not delta:
        missing = sorted(set(ref) - set(new))
        if missing:
            problems.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} (the current version has them)")
    return "; ".join(problems[:8]) or None


def tiling_problem(layouts: Mapping[str, Mapping[str, list]]) -> tuple[Layout, str | None]:
    """Merge the shards' stage replies (param -> [dtype, shape, ranges]); check that every tensor's
    pieces tile its elements exactly, with one dtype and shape. Returns (layout, problem)."""
    merged: dict[str, list] = {}
    problems = []
    for lay in layouts.values():
        for param, (dtype, shape, ranges) in lay.items():
            entry = merged.setdefault(param, [dtype, tuple(shape), set()])
            if (entry[0], entry[1]) != (dtype, tuple(shape)):
                problems.append(f"{param}: shards disagree on its shape or dtype")
            entry[2].update(tuple(r) for r in ranges)  # replicated pieces: each range counted once
    for param, (_dtype, shape, ranges) in merged.items():
        numel, edge = math.prod(shape), 0  # exact Python ints (1 for a scalar)
        for start, stop in sorted(ranges):
            if start != edge:
                problems.append(f"{param}: pieces {'overlap' if start < edge else 'leave a gap'} at element {edge}")
                break
            edge = stop
        else:
            if edge != numel:
                problems.append(f"{param}: pieces cover {edge} of {numel} elements")
    return {p: (d, s) for p, (d, s, _) in merged.items()}, ("; ".join(problems[:8]) or None)


def _hello_header(layout_of: Mapping | None) -> dict:
    """A publisher's hello; with `layout_of` ({model, version}) it asks for that version's layout too."""
    return {"cmd": "hello", **({"layout_of": dict(layout_of)} if layout_of is not None else {})}


class ParamClient:
    def __init__(self, shards: str | Mapping[str, str], chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 timeout: float = 30.0, security: Security | None = None, replicas: int | None = None,
                 write_quorum: int | None = None):
        self.shards = parse_shards(shards) if isinstance(shards, str) else dict(shards)
        self.chunk_bytes = chunk_bytes
        self.replicas = resolve_replicas(replicas, len(self.shards))
        self.write_quorum = self.replicas if write_quorum is None else write_quorum
        problem = quorum_problem(self.write_quorum, self.replicas)
        if problem:
            raise ValueError(problem)
        self.ring = ring(self.shards)
        self.fp = fingerprint(self.shards, self.replicas)
        self.last_report: dict = {}  # the last publish or rollback: shards missed, pieces under-replicated
        self._ctx = zmq.Context()
        self.rpc = ShardRPC(self._ctx, self.shards, timeout, security)  # Security(dir, "publisher") with keys

    def close(self) -> None:
        self.rpc.close()
        self._ctx.term()

    def __enter__(self) -> "ParamClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def hello(self, timeout: float | None = None, layout_of: Mapping | None = None) -> dict[str, dict]:
        """Every shard's hello (ShardCallError if one does not answer); `layout_of` ({model,
        version or None for the current one}) asks each for that version's layout too (`layout_of`
        in the reply: what `publish` checks a new version against, without a round trip more)."""
        out = {n: h for n, (h, _) in self.rpc.call_all(_hello_header(layout_of), timeout).items()}
        self._check_ring(out)
        return out

    def live(self, timeout: float | None = None, layout_of: Mapping | None = None
             ) -> tuple[dict[str, dict], dict[str, str]]:
        """The hellos of the shards that answer, and why the others did not. RingMismatch if
        one answers with another ring; PublishError if too few answer to see every piece.
        `layout_of`: as for `hello`."""
        replies = self.rpc.call_all(_hello_header(layout_of), timeout, raise_on_error=False)
        states = {n: h for n, (h, _) in replies.items() if h.get("ok")}
        self._check_ring(states)
        down = {n: _why(replies.get(n))[1] for n in self.shards if n not in states}
        if len(states) < min_live(len(self.shards), self.replicas):
            raise PublishError(f"only {len(states)} of {len(self.shards)} shards answer (with --replicas "
                               f"{self.replicas} at least {min_live(len(self.shards), self.replicas)} must): "
                               + "; ".join(f"{n}: {w}" for n, w in sorted(down.items())))
        return states, down

    def _check_ring(self, states: Mapping[str, dict]) -> None:
        for n, h in sorted(states.items()):
            problem = ring_problem(n, h, self.replicas, self.fp)
            if problem:
                raise RingMismatch(problem)

    def versions(self, model: str) -> dict[str, dict]:
        """Per shard: committed versions and the current one (plus corrupt versions and a fallback, if any;
        a shard that does not answer: its error)."""
        out = {}
        states, down = self.live() if self.replicas > 1 else (self.hello(), {})
        for n, why in down.items():
            out[n] = {"versions": [], "current": None, "error": why}
        for n, h in states.items():
            out[n] = {"versions": h["versions"].get(model, []), "current": h["current"].get(model)}
            rep = h.get("repair") if isinstance(h.get("repair"), dict) else None
            if rep and rep.get("under_replicated_versions"):
                out[n]["repair"] = f"{rep['under_replicated_versions']} version(s) to repair"
            for extra in ("corrupt", "fallback"):  # a corrupt current replaced by an older one, say so
                if (h.get(extra) or {}).get(model):
                    out[n][extra] = h[extra][model]
        return out

    def layout(self, model: str, version: int, among: Iterable[str] | None = None) -> Layout:
        """The tensors (dtype, shape) of a committed version, from the shards' manifests."""
        return {item[1]: (item[2], tuple(item[3])) for items in self.manifests(model, version, among).values()
                for item in items}

    def _hello_layout(self, states: Mapping[str, dict], model: str, version: int) -> Layout | None:
        """The layout of `version` from the shards' hellos (`layout_of`), as `layout` reads it from
        their manifests; None unless enough of them sent it that together they name every piece
        (the rule `manifests` applies). A layout that is not a {tensor: [dtype, shape]} map of
        names, dtype names and dimensions is not used (the manifests are read instead)."""
        got = []
        for h in states.values():
            lay = h.get("layout_of")
            if (isinstance(lay, dict) and lay.get("model") == model and lay.get("version") == version
                    and isinstance(lay.get("layout"), dict)):
                got.append(lay["layout"])
        if len(got) < min_live(len(self.shards), self.replicas):
            return None
        out: Layout = {}
        for lay in got:
            for name, entry in lay.items():
                if not (isinstance(name, str) and isinstance(entry, list) and len(entry) == 2
                        and isinstance(entry[0], str) and isinstance(entry[1], list)
                        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1])):
                    return None
                out[name] = (entry[0], tuple(entry[1]))
        return out

    def manifests(self, model: str, version: int, among: Iterable[str] | None = None) -> dict[str, list]:
        """{shard: manifest of `version`} from the shards that hold it (asking only `among`, when
        given: the shards a publish found up, so one found down costs no second timeout);
        ShardCallError unless enough hold it that together they name every piece (all of them with
        one replica)."""
        header = {"cmd": "fetch", "model": model, "version": version, "manifest_only": True}
        asked = self.shards if among is None else [n for n in self.shards if n in set(among)]
        replies = self.rpc.call({n: (header, []) for n in asked}, raise_on_error=self.replicas == 1)
        got = {n: h["manifest"] for n, (h, _) in replies.items() if h.get("ok") and isinstance(h.get("manifest"), list)}
        if len(got) < min_live(len(self.shards), self.replicas):
            raise ShardCallError({n: _why(replies.get(n))[1] for n in self.shards if n not in got})
        return got

    def _holders(self, manifests: Mapping[str, list]) -> dict[str, int]:
        """piece key -> how many shards hold it (by their manifests)."""
        count: dict[str, int] = {}
        for items in manifests.values():
            for item in items:
                count[item[0]] = count.get(item[0], 0) + 1
        return count

    def publish(self, model: str, tensors: Mapping[str, Any], version: int | None = None,
                base: int | None = None, allow_new: bool = False, allow_layout_change: bool = False,
                check_workers: bool = True, worker_check_s: float = WORKER_CHECK_S,
                progress: Callable[[dict[str, tuple[int, int]]], None] | None = None) -> int:
        """Publish a full state dict, or with `base` a delta: only `tensors` change, the rest is base's.

        Refused (PublishError, nothing committed) when a delta's tensors differ in shape or dtype
        from the base's or are new (unless `allow_new`), or when a full version would not fit the
        current version's layout (unless `allow_layout_change`). PublishConflict when the version
        number is taken by other content. After the commit, with `check_workers`, waits (at most
        `worker_check_s`) for a live worker that follows the model to load it: if every one
        refuses it, the publish is reverted (the previous version current again) and
        PublishRefused raised; if none has loaded it in time, PublishError (the version stays
        current). `progress` gets {shard: (bytes sent, bytes in all)} while the stages travel."""
        problem = model_name_problem(model)
        if problem:
            raise PublishError(f"cannot publish: {problem}")
        ask = {"model": model, "version": base}  # the layout to check against, in the same round trip
        try:
            states, down = self.live(layout_of=ask) if self.replicas > 1 else (self.hello(layout_of=ask), {})
        except ShardCallError as exc:
            raise PublishError(f"cannot publish {model!r}: {exc}") from None
        except PublishError as exc:
            if isinstance(exc, RingMismatch):
                raise
            raise PublishError(f"cannot publish {model!r}: {exc}") from None
        previous = {n: h["current"].get(model) for n, h in states.items()}
        if version is None:  # also above any number a live worker remembers (a reverted version it refused)
            seen = [v for h in states.values() for v in h["versions"].get(model, [])]
            seen += [v for h in states.values() for v in _follower_versions(h, model)]
            version = 1 + max(seen, default=0)
        elif (all(version not in h["versions"].get(model, []) for h in states.values())
              and any(version in _follower_versions(h, model, refused_only=True) for h in states.values())):
            raise PublishError(f"cannot publish {model!r} v{version}: a live worker remembers refusing a version of "
                               f"that number (since reverted) and would not load it; publish under another number "
                               f"(leave --version out to get one)")
        arrays = {name: to_numpy(t) for name, t in tensors.items()}
        new_layout = {n: (a.dtype.name, tuple(a.shape)) for n, a in arrays.items()}
        currents = set(previous.values()) - {None}
        ref_version = base if base is not None else (currents.pop() if len(currents) == 1 else None)
        if ref_version is not None and (base is not None or not allow_layout_change):
            ref = self._hello_layout(states, model, ref_version)
            if ref is None:  # not from enough hellos (a shard from before `layout_of`): the manifests, as ever
                try:
                    ref = self.layout(model, ref_version, among=states)
                except ShardCallError as exc:
                    raise PublishError(f"cannot read the layout of {model!r} v{ref_version}: {exc}") from None
            problem = layout_problem(new_layout, ref, base is not None, allow_new)
            if problem:
                what = (f"delta on v{base}" if base is not None else
                        f"full version (the current v{ref_version} would be replaced by weights no worker can load;"
                        f" pass allow_layout_change / --allow-layout-change if the model changed)")
                raise PublishError(f"refused to publish {model!r} v{version}, {what}: {problem}; nothing changed")
        token = uuid.uuid4().hex
        pieces = plan({n: (a.dtype.name, a.shape, a.dtype.itemsize) for n, a in arrays.items()}, self.chunk_bytes)
        flat = {n: a.reshape(-1) for n, a in arrays.items()}
        requests = {}
        replace = {n: [d, list(shp)] for n, (d, shp) in new_layout.items()} if base is not None else None
        placed = {n: mine for n, mine in place(pieces, self.ring, self.replicas).items() if n in states}
        unique = {p.key: p for mine in placed.values() for p in mine}  # a piece on R owners is hashed once
        frame_of = {k: memoryview(np.ascontiguousarray(flat[p.param][p.start:p.stop])).cast("B")
                    for k, p in unique.items()}
        item_of = {k: [*p.as_list(), c] for (k, p), c in zip(unique.items(), hash_all(list(frame_of.values())), strict=True)}
        for shard, mine in placed.items():
            requests[shard] = ({"cmd": "stage", "model": model, "version": version, "base": base, "token": token,
                                "replace": replace, "pieces": [item_of[p.key] for p in mine]},
                               [frame_of[p.key] for p in mine])
        sums = list(item_of.values())  # each piece once: the digest does not depend on which owners were up
        digest = hashlib.sha256(json.dumps([base, sorted(sums)], separators=(",", ":")).encode()).hexdigest()
        for header, _ in requests.values():
            header["digest"] = digest
        ids = {"model": model, "version": version, "token": token, "digest": digest}
        replies = self.rpc.call(requests, raise_on_error=False, progress=progress)
        failed = {n: _why(replies.get(n)) for n in requests if n not in replies or not replies[n][0].get("ok")}
        staged = sorted(n for n in requests if n not in failed)
        short = self._short(pieces, staged)
        conflict = any(code == "CONFLICT" for code, _ in failed.values())
        problem = None if (short or conflict) else tiling_problem(
            {n: replies[n][0].get("layout", {}) for n in staged})[1]
        if failed and not short and not conflict and not problem:
            log.warning("stage_missed_shards", model=model, version=version,
                        shards={n: m for n, (_, m) in sorted(failed.items())}, write_quorum=self.write_quorum)
        if short or conflict or problem:  # only the shards staged on hold anything to drop
            self.rpc.call({n: ({"cmd": "abort", **ids}, []) for n in requests}, timeout=2, raise_on_error=False)
            if any(code == "CONFLICT" for code, _ in failed.values()):
                raise PublishConflict(f"{model!r} v{version} is already committed with other content; "
                                      f"nothing of this publish is served")
            why = problem or "; ".join([*(f"{n}: {msg}" for n, (_, msg) in sorted(failed.items())),
                                        *(f"{n}: down ({w})" for n, w in sorted(down.items()))])
            if short:
                why = f"{short}; {why}"
            raise PublishError(f"publish of {model!r} v{version} failed while staging, nothing changed: {why}")
        arbiter, *rest = staged  # one shard decides between racing publishers (the first by name that staged)
        ids["epoch"] = time.time_ns()
        committing = time.monotonic()  # a worker's report from before this cannot speak of this content
        first = self.rpc.call({arbiter: ({"cmd": "commit", **ids}, [])}, raise_on_error=False)
        arbiter_ok = bool(first.get(arbiter, ({}, []))[0].get("ok"))
        code, msg = (None, "") if arbiter_ok else _why(first.get(arbiter))
        if code == "CONFLICT":
            self.rpc.call_all({"cmd": "abort", **ids}, timeout=2, raise_on_error=False)
            raise PublishConflict(f"{model!r} v{version}: another publisher committed it first ({msg}); "
                                  f"nothing of this publish is served")
        failed = {} if arbiter_ok else {arbiter: (code, msg)}
        if not failed and rest:
            replies = self.rpc.call({n: ({"cmd": "commit", **ids}, []) for n in rest}, raise_on_error=False)
            failed = {n: _why(replies.get(n)) for n in rest if n not in replies or not replies[n][0].get("ok")}
        committed = [n for n in staged if n not in failed]
        short = self._short(pieces, committed) if arbiter_ok else "the arbiter shard did not commit"
        if short:
            why = "; ".join(f"{n}: {m}" for n, (_, m) in sorted(failed.items()))
            now = self._revert(model, ids, previous, staged)  # raises if some shard never confirms
            raise PublishError(f"publish of {model!r} v{version} failed to commit ({short}: {why}); reverted, "
                               f"{_after_revert(now, {n: previous.get(n) for n in staged})}")
        missed = sorted(set(self.shards) - set(committed))
        self.last_report = {"model": model, "version": version, "missed": missed,
                            "under_replicated_pieces": self._under(pieces, committed),
                            "why": {**{n: m for n, (_, m) in failed.items()}, **down}}
        if missed:
            log.warning("published_with_missed_shards", model=model, version=version, missed=missed,
                        under_replicated_pieces=self.last_report["under_replicated_pieces"],
                        write_quorum=self.write_quorum, why="those shards repair themselves from the other owners")
        log.info("published", model=model, version=version, base=base, tensors=len(arrays), pieces=len(pieces))
        if check_workers:
            self._check_workers(model, version, ids, previous, committing, worker_check_s)
        return version

    def _short(self, pieces, shards) -> str | None:
        """Why these shards do not hold every piece on at least W owners (None if they do)."""
        have = set(shards)
        for p in pieces:
            n = sum(1 for o in owners(p.key, self.ring, self.replicas) if o in have)
            if n < self.write_quorum:
                return (f"piece {p.key} would be on {n} of its {self.replicas} owners, fewer than the write quorum "
                        f"{self.write_quorum} (owners {owners(p.key, self.ring, self.replicas)})")
        return None

    def _under(self, pieces, shards) -> int:
        """How many pieces are on fewer than all R of their owners among `shards`."""
        have = set(shards)
        return sum(1 for p in pieces if not all(o in have for o in owners(p.key, self.ring, self.replicas)))

    def _check_workers(self, model: str, version: int, ids: dict, previous: Mapping[str, int | None],
                       start: float, limit_s: float) -> None:
        """Wait until a live worker that follows `model` has built `version` (what the shards'
        `hello.followers` say: paramserver/followers.py). Every one refusing it: revert and raise
        PublishRefused; none deciding within `limit_s`: PublishError, the version stays current.
        No worker following the model: nothing to check. Only reports made after `start` (the
        commit) count: one from before may speak of a reverted version of the same number."""
        end = time.monotonic() + limit_s
        verdicts: dict[str, str] = {}
        pause = WORKER_CHECK_POLL_FIRST_S  # a delta's workers report within ~20 ms: ask soon, then less often
        while True:
            followers = self._followers(model)
            if not followers:
                log.info("publish_not_checked", model=model, version=version, why="no live worker follows the model")
                return
            since = time.monotonic() - start  # only a report made after the commit speaks of this version
            verdicts = {n: _verdict(state, version) if age <= since else "waiting"
                        for n, (age, state) in followers.items()}
            if "loaded" in verdicts.values():
                log.info("publish_accepted", model=model, version=version,
                         workers=sorted(n for n, v in verdicts.items() if v == "loaded"))
                return
            if all(v.startswith("refused") for v in verdicts.values()):
                now = self._revert(model, ids, previous, list(previous))
                raise PublishRefused(f"refused: every live worker serving {model!r} ({', '.join(sorted(verdicts))}) "
                                     f"refused v{version} (see `ringserve-admin status` for why); reverted, "
                                     f"{_after_revert(now, previous)}. Publish with --no-worker-check "
                                     f"(check_workers=False) to make it current anyway, e.g. before restarting "
                                     f"the workers with a changed model")
            if time.monotonic() >= end:
                waiting = sorted(n for n, v in verdicts.items() if v == "waiting")
                raise PublishError(f"{model!r} v{version} is committed and current, but no live worker loaded it "
                                   f"within {limit_s:g}s (still waiting: {', '.join(waiting)}); check "
                                   f"`ringserve-admin status`, roll back if it is wrong")
            time.sleep(max(0.0, min(pause, end - time.monotonic())))
            pause = min(2 * pause, WORKER_CHECK_POLL_MAX_S)

    def _followers(self, model: str) -> dict[str, tuple[float, dict]]:
        """(age in seconds, state) of the freshest report of every live worker following `model`,
        over all shards."""
        best: dict[str, tuple[float, dict]] = {}
        replies = self.rpc.call_all({"cmd": "hello"}, timeout=min(self.rpc.timeout, 2.0), raise_on_error=False)
        for header, _ in replies.values():
            reports = header.get("followers") if isinstance(header.get("followers"), dict) else {}
            for name, rep in reports.items():
                models = rep.get("models") if isinstance(rep, dict) else None
                state = models.get(model) if isinstance(models, dict) else None
                age = rep.get("age_s") if isinstance(rep, dict) else None
                if isinstance(state, dict) and isinstance(age, (int, float)) and (name not in best or age < best[name][0]):
                    best[name] = (age, state)
        return best

    def _revert(self, model: str, ids: dict, previous: Mapping[str, int | None],
                targets: list[str] | None = None) -> dict[str, int | None]:
        """Tell every shard, answering or not, to undo this publish, and keep asking (bounded:
        max(10 s, 3 x timeout)) until each confirms: a commit that lands late on a slow shard
        must be undone too, or the shards would disagree. Returns each shard's current version
        after the revert, as it says."""
        todo = set(self.shards if targets is None else targets)  # a shard that staged nothing committed nothing
        ids = {**ids, "epoch": time.time_ns()}  # newer than the commit's: repair never brings it back
        now: dict[str, int | None] = {}
        end = time.monotonic() + max(10.0, 3 * self.rpc.timeout)
        while todo and time.monotonic() < end:
            replies = self.rpc.call({n: ({"cmd": "revert", **ids, "previous": previous.get(n)}, []) for n in todo},
                                    timeout=min(self.rpc.timeout, max(0.5, end - time.monotonic())),
                                    raise_on_error=False)
            for n, (h, _) in replies.items():
                if h.get("ok"):
                    todo.discard(n)
                    now[n] = h.get("current", previous.get(n))
            if todo:
                time.sleep(0.2)
        if todo:
            log.error("revert_unconfirmed", model=model, version=ids["version"], shards=sorted(todo))
            raise PublishError(f"publish of {model!r} v{ids['version']} failed and shards {sorted(todo)} did not "
                               f"confirm the revert; workers keep the previous version while shards disagree; "
                               f"repair with a rollback once they answer")
        return now

    def placement_status(self, model: str, version: int) -> dict:
        """How far each shard's share of `version` is from what this client's ring says: per
        shard, owned pieces it lacks and pieces it holds but no longer owns (a rebalance is done
        when both are 0 everywhere), and the pieces on fewer than W owners."""
        replies = self.rpc.call_all({"cmd": "fetch", "model": model, "version": version, "manifest_only": True},
                                    raise_on_error=False)
        held = {n: {item[0] for item in h["manifest"]} for n, (h, _) in replies.items()
                if h.get("ok") and isinstance(h.get("manifest"), list)}
        keys = set().union(*held.values()) if held else set()
        out = {n: {"missing": 0, "spare": 0} for n in self.shards}
        for n in self.shards:
            if n not in held:
                out[n]["error"] = _why(replies.get(n))[1]
        thin = 0
        for k in keys:
            own = owners(k, self.ring, self.replicas)
            for n in own:
                if n in held and k not in held[n]:
                    out[n]["missing"] += 1
            for n, ks in held.items():
                if k in ks and n not in own:
                    out[n]["spare"] += 1
            thin += sum(1 for n in own if k in held.get(n, ())) < self.write_quorum
        return {"model": model, "version": version, "pieces": len(keys), "shards": out, "under_quorum": thin,
                "done": all(v["missing"] == 0 and v["spare"] == 0 and "error" not in v for v in out.values())}

    def publish_file(self, model: str, path: str, version: int | None = None, base: int | None = None,
                     **options: Any) -> int:
        return self.publish(model, load_file(path), version, base, **options)

    def rollback(self, model: str, version: int) -> None:
        """Make an earlier committed version current on every shard; workers swap back.

        With replicas: refused unless every piece of `version` is on at least W owners that
        answer; shards that do not answer are reported in `last_report["missed"]` and adopt it
        by repair (its epoch is newer)."""
        epoch = time.time_ns()
        if self.replicas == 1:
            try:
                self.rpc.call_all({"cmd": "rollback", "model": model, "version": version, "epoch": epoch})
            except ShardCallError as exc:
                raise PublishError(f"rollback of {model!r} to v{version} failed: {exc}") from None
            self.last_report = {"model": model, "version": version, "missed": []}
            return
        try:
            self.live()
            manifests = self.manifests(model, version)
        except ShardCallError as exc:
            raise PublishError(f"rollback of {model!r} to v{version} refused: too few shards hold it ({exc})") from None
        thin = sorted(k for k, c in self._holders(manifests).items() if c < self.write_quorum)
        if thin:
            raise PublishError(f"rollback of {model!r} to v{version} refused: {len(thin)} of its pieces (e.g. "
                               f"{thin[0]}) are on fewer than {self.write_quorum} owners that answer; nothing changed")
        replies = self.rpc.call({n: ({"cmd": "rollback", "model": model, "version": version, "epoch": epoch}, [])
                                 for n in manifests}, raise_on_error=False)
        done = sorted(n for n in manifests if n in replies and replies[n][0].get("ok"))
        if not done:
            raise PublishError(f"rollback of {model!r} to v{version} failed: no shard confirmed it")
        self.last_report = {"model": model, "version": version, "missed": sorted(set(self.shards) - set(done))}
        if self.last_report["missed"]:
            log.warning("rollback_missed_shards", model=model, version=version, missed=self.last_report["missed"],
                        why="they adopt it from the other owners (repair)")


def hash_all(buffers: list, algorithm: str = PIECE_DIGEST) -> list[str]:
    """The checksum (protocol/digest.py) of each buffer, on up to HASH_THREADS threads (blake3 and
    hashlib release the GIL on large buffers)."""
    if len(buffers) < 2 or HASH_THREADS < 2:
        return [piece_checksum(b, algorithm) for b in buffers]
    with ThreadPoolExecutor(min(HASH_THREADS, len(buffers))) as pool:
        return list(pool.map(lambda b: piece_checksum(b, algorithm), buffers))


def _follower_versions(hello: Mapping, model: str, refused_only: bool = False) -> list[int]:
    """Every version number of `model` the workers following a shard mention (served, built,
    refused; or only refused)."""
    out = []
    reports = hello.get("followers") if isinstance(hello.get("followers"), dict) else {}
    for rep in reports.values():
        state = rep.get("models", {}).get(model) if isinstance(rep, dict) and isinstance(rep.get("models"), dict) \
            else None
        if isinstance(state, dict):
            named = [] if refused_only else [state.get("version"), *(state.get("loaded") or [])]
            out += [v for v in [*named, *(state.get("refused") or [])] if isinstance(v, int) and not isinstance(v, bool)]
    return out


def _verdict(state: Mapping, version: int) -> str:
    """One worker's word on `version`: "loaded", "refused" or "waiting"."""
    if version in (state.get("loaded") or []) or state.get("version") == version:
        return "loaded"
    return "refused" if version in (state.get("refused") or []) else "waiting"


def _after_revert(now: Mapping[str, int | None], previous: Mapping[str, int | None]) -> str:
    """What a revert left current, as the shards said: the truth, not what was hoped."""
    if all(now.get(n) == v for n, v in previous.items()):
        cur = set(previous.values())
        if cur == {None}:
            return "no version is current, as before"
        return (f"the previous version v{cur.pop()} stays current" if len(cur) == 1
                else "each shard's previous version stays current")
    return "but the shards now have current " + ", ".join(
        f"{n}: {'none' if now.get(n) is None else 'v' + str(now.get(n))}" for n in sorted(now)) + \
        " (the previous version was lost); repair with a rollback"


def _why(reply: tuple[dict, list] | None) -> tuple[str | None, str]:
    """(error code, message) of a failed shard reply; (None, 'no answer') when there was none."""
    if reply is None:
        return None, "no answer"
    err = reply[0].get("error") if isinstance(reply[0].get("error"), dict) else {}
    return err.get("code"), str(err.get("message", reply[0]))


def changed_tensors(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The tensors of `new` that differ from `old`: what a delta publish needs to send."""
    out = {}
    for name, value in new.items():
        a = to_numpy(value)
        if name not in old or not np.array_equal(a, to_numpy(old[name])):
            out[name] = a
    return out
