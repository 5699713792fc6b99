"""Anti-entropy between the owners of pieces (issue 20): a shard fills in what it should hold.

A shard started with the shard list (`--shards`) runs this on a thread of its own, with
sockets of its own. Each round it asks every shard (itself included, over the network: no
state is shared with the command loop) for its hello, and for each kept version some peer
holds and it lacks, reads the peers' manifests of that version, keeps the pieces it owns
(protocol/placement.py `owners`), fetches them from the peers that have them (checksums
checked, at most `max_bytes_per_s`), and hands the whole version to the command loop, which
stores it like a commit (paramserver/store.py `install`). It only repairs a version when the
peers' manifests surely name every piece it owns: either fewer than R-1 other shards are
missing, or their union matches the version's full-publish digest. Then, if a peer's current
version carries a newer epoch than its own and it holds that version, it adopts it (a shard
that was down during a publish or a rollback catches up with no publish needed).

Every FULL_CHECK_S (and at start) it also compares the versions it holds with the other
owners' manifests: a piece it owns (by its ring) but lacks is fetched and added to its
manifest, and a piece it holds but no longer owns is dropped once every one of its owners holds
it. That is how a shard list change rebalances: restart the shards with the new list (one at
a time) and only the pieces whose owners change move (docs/operations.md).

What it finds is kept in `status` (read by the shard's hello and metrics): versions and pieces
under-replicated here, what was repaired, the last round's time and error.
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from typing import Mapping

import numpy as np
import structlog
import zmq

from ringserve.paramserver.store import Slice, is_checksum
from ringserve.protocol.digest import checksum_matches
from ringserve.protocol.placement import Piece, dtype_problem, fingerprint, model_name_problem, owners, ring
from ringserve.protocol.security import Security
from ringserve.protocol.shardrpc import ShardRPC

log = structlog.get_logger("ringserve.paramserver.repair")

BATCH_BYTES = 8 << 20  # bytes asked for per fetch
MAX_VERSIONS_PER_ROUND = 4  # bounded work per round: the next round goes on
FULL_CHECK_S = 30.0  # how often the versions held here are compared with the other owners'


def full_digest(items: list[list]) -> str:
    """The digest a full publish (no base) of exactly these pieces has (client/params.py)."""
    return hashlib.sha256(json.dumps([None, sorted(items)], separators=(",", ":")).encode()).hexdigest()


class Repairer(threading.Thread):
    def __init__(self, name: str, shards: Mapping[str, str], replicas: int, keep: int, apply: "queue.Queue",
                 interval: float = 2.0, max_bytes_per_s: float = 0.0, timeout: float = 5.0,
                 security: Security | None = None, full_check_s: float = FULL_CHECK_S):
        super().__init__(name="ringserve-shard-repair", daemon=True)
        self.me, self.shards, self.replicas, self.keep = name, dict(shards), replicas, keep
        self.apply, self.interval, self.max_bytes_per_s, self.timeout = apply, interval, max_bytes_per_s, timeout
        self.full_check_s = full_check_s
        self.security = security or Security()
        self.ring = ring(self.shards)
        self.fp = fingerprint(self.shards, replicas)
        self.stopping = threading.Event()
        self.status: dict = {"rounds": 0, "under_replicated_versions": 0, "under_replicated_pieces": 0,
                             "repaired_versions": 0, "repaired_pieces": 0, "repaired_bytes": 0,
                             "adopted_current": 0, "peers_unreachable": [], "in_progress": None,
                             "last_round_s": None, "last_error": None}
        self._sent_at = time.monotonic()
        self._sent = 0
        self._last_full: float | None = None

    def run(self) -> None:
        ctx = zmq.Context()
        rpc = ShardRPC(ctx, self.shards, self.timeout, self.security)
        try:
            while not self.stopping.wait(self.interval):
                started = time.monotonic()
                try:
                    self.round(rpc)
                    self.status["last_error"] = None
                except Exception as exc:  # noqa: BLE001 - a failed round is retried next interval
                    self.status["last_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    log.warning("repair_round_failed", shard=self.me, error=self.status["last_error"])
                self.status["rounds"] += 1
                self.status["last_round_s"] = round(time.monotonic() - started, 3)
                self.status["in_progress"] = None
        finally:
            rpc.close()
            ctx.destroy(linger=0)

    # -------------------------------------------------------------- one round
    def round(self, rpc: ShardRPC) -> None:
        replies = rpc.call_all({"cmd": "hello"}, timeout=min(self.timeout, 2.0), raise_on_error=False)
        hellos = {n: h for n, (h, _) in replies.items() if h.get("ok")}
        self.status["peers_unreachable"] = sorted(set(self.shards) - set(hellos))
        me = hellos.pop(self.me, None)
        if me is None:
            return  # our own command loop is busy or stopping: next round
        peers = hellos  # pieces are read by key: a peer on another ring (mid-rebalance) serves them too
        full = self._last_full is None or time.monotonic() - self._last_full >= self.full_check_s
        under_v = under_p = done = 0
        models = {m for h in peers.values() if isinstance(h.get("versions"), dict) for m in h["versions"]}
        for model in sorted(m for m in models if model_name_problem(m) is None):  # a peer's names are checked
            mine = set(_ints((me.get("versions") or {}).get(model)))
            corrupt = set(int(v) for v in ((me.get("corrupt") or {}).get(model) or {}) if str(v).isdigit())
            theirs = sorted({v for h in peers.values() for v in _ints((h.get("versions") or {}).get(model))})
            lacking = [v for v in theirs[-self.keep:] if v not in mine or v in corrupt]
            for version in lacking:
                under_v += 1
                if done >= MAX_VERSIONS_PER_ROUND or self.stopping.is_set():
                    continue
                got = self.repair_version(rpc, model, version, peers)
                if got is not None:
                    under_p += got[1]
                    done += got[0]
            self.adopt_current(model, me, peers, mine | set(lacking))
            if full:
                for version in sorted(mine - corrupt):
                    if version in theirs and not self.stopping.is_set():
                        under_p += self.rebalance_version(rpc, model, version, peers)
        if full:
            self._last_full = time.monotonic()
        self.status["under_replicated_versions"] = max(0, under_v - done)
        if full or under_v:  # between full checks only versions lacking whole are counted
            self.status["under_replicated_pieces"] = under_p

    def repair_version(self, rpc: ShardRPC, model: str, version: int, peers: Mapping[str, dict]
                       ) -> tuple[int, int] | None:
        """Copy this shard's pieces of `version` from the peers. Returns (1 if queued for storing
        else 0, pieces still missing here), or None when the peers cannot tell what we own."""
        got = self.collect(rpc, model, version, peers)
        if got is None:
            return None
        items, where, digest = got
        own = {k: it for k, it in items.items() if self.me in owners(k, self.ring, self.replicas)}
        self.status["in_progress"] = {"model": model, "version": version, "pieces": len(own)}
        sl = Slice(version, digest=str(digest or ""))
        if not self.copy(rpc, model, version, own, where, sl):
            return 0, len(own)  # a peer went away: try again next round
        self.apply.put(("install", model, sl), timeout=5)  # bounded: never stuck on a stopped loop
        self.status["repaired_versions"] += 1
        self.status["repaired_pieces"] += len(own)
        self.status["repaired_bytes"] += sum(a.nbytes for a in sl.data.values())
        log.info("version_repaired", shard=self.me, model=model, version=version, pieces=len(own))
        return 1, 0

    def rebalance_version(self, rpc: ShardRPC, model: str, version: int, peers: Mapping[str, dict]) -> int:
        """A version held here: add the pieces owned here that it lacks, drop those no longer owned
        here that all their owners hold. Returns how many owned pieces are still missing."""
        got = self.collect(rpc, model, version, peers, with_self=True)
        if got is None:
            return 0
        items, where, digest = got
        mine = {k for k, ns in where.items() if self.me in ns}
        own = {k for k in items if self.me in owners(k, self.ring, self.replicas)}
        lacking = {k: items[k] for k in own - mine}
        if lacking:
            sl = Slice(version, digest=str(digest or ""))
            if not self.copy(rpc, model, version, lacking, {k: [n for n in where[k] if n != self.me]
                                                              for k in lacking}, sl):
                return len(lacking)
            self.apply.put(("merge", model, sl), timeout=5)  # bounded: never stuck on a stopped loop
            self.status["repaired_pieces"] += len(lacking)
            self.status["repaired_bytes"] += sum(a.nbytes for a in sl.data.values())
            log.info("version_rebalanced_in", shard=self.me, model=model, version=version, pieces=len(lacking))
        spare = [k for k in mine - own
                 if all(n in where[k] for n in owners(k, self.ring, self.replicas))]
        if spare:
            self.apply.put(("drop", model, version, spare), timeout=5)  # bounded: never stuck on a stopped loop
            log.info("version_rebalanced_out", shard=self.me, model=model, version=version, pieces=len(spare))
        return 0

    def collect(self, rpc: ShardRPC, model: str, version: int, peers: Mapping[str, dict], with_self: bool = False
                ) -> tuple[dict[str, list], dict[str, list[str]], str | None] | None:
        """The union of the holders' manifests of `version` (item per key, who lists it, the
        digest), or None when they may not name every piece owned here."""
        holders = [n for n, h in peers.items() if version in _ints((h.get("versions") or {}).get(model))]
        if with_self:
            holders.append(self.me)
        replies = rpc.call({n: ({"cmd": "fetch", "model": model, "version": version, "manifest_only": True}, [])
                            for n in holders}, timeout=self.timeout, raise_on_error=False)
        items: dict[str, list] = {}
        where: dict[str, list[str]] = {}
        digest = None
        for n, (h, _) in replies.items():
            if not h.get("ok") or not isinstance(h.get("manifest"), list):
                continue
            digest = digest or h.get("digest")
            for item in h["manifest"]:
                if not (isinstance(item, list) and len(item) == 7 and isinstance(item[0], str)
                        and is_checksum(item[6])):
                    raise ValueError(f"{n}: bad manifest entry of {model} v{version}")
                if items.setdefault(item[0], item) != item:
                    raise ValueError(f"{model} v{version}: owners disagree on piece {item[0]}")
                where.setdefault(item[0], []).append(n)
        answered = {n for n, (h, _) in replies.items() if h.get("ok")}
        missing = set(self.shards) - answered - {self.me}
        complete = len(missing) <= self.replicas - 2 or (digest is not None and full_digest(list(items.values())) == digest)
        if not answered - {self.me} or not complete or (with_self and self.me not in answered):
            log.info("repair_version_unsure", shard=self.me, model=model, version=version,
                     answered=sorted(answered), why="the peers' manifests may not name every piece owned here")
            return None
        return items, where, digest

    def copy(self, rpc: ShardRPC, model: str, version: int, own: Mapping[str, list],
             where: Mapping[str, list[str]], sl: Slice) -> bool:
        """Fetch `own` (key -> item) from the shards listing them into `sl`, spread over them;
        False when a peer failed (the round ends, the next one retries)."""
        load: dict[str, int] = {}
        by_holder: dict[str, list[list]] = {}
        for k, it in own.items():
            src = min(where[k], key=lambda n: (load.get(n, 0), n))
            load[src] = load.get(src, 0) + 1
            by_holder.setdefault(src, []).append(it)
        for src, its in by_holder.items():
            for batch in _batches(its):
                self._throttle(sum(_nbytes(it) for it in batch))
                reply = rpc.call({src: ({"cmd": "fetch", "model": model, "version": version,
                                         "keys": [it[0] for it in batch]}, [])},
                                 timeout=self.timeout, raise_on_error=False).get(src)
                if reply is None or not reply[0].get("ok"):
                    return False
                header, frames = reply
                listed = header.get("pieces") if isinstance(header.get("pieces"), list) else []
                if len(listed) != len(frames):
                    return False
                got = {it[0]: (it, f) for it, f in zip(listed, frames, strict=True)
                       if isinstance(it, list) and it and isinstance(it[0], str)}
                for it in batch:
                    if it[0] not in got or got[it[0]][0] != it:
                        return False
                    buf = got[it[0]][1].buffer  # the frame's memory, kept by the array below: no copy
                    if not checksum_matches(buf, it[6]):
                        raise ValueError(f"{src}: piece {it[0]} of {model} v{version} failed its checksum")
                    piece = Piece.from_list(it[:6])
                    if dtype_problem(piece.dtype) or len(buf) != _nbytes(it) or not 0 <= piece.start <= piece.stop:
                        raise ValueError(f"{src}: piece {it[0]!r:.80} of {model} v{version} is malformed")
                    sl.pieces[piece.key], sl.checksums[piece.key] = piece, it[6]
                    sl.data[piece.key] = np.frombuffer(buf, dtype=piece.dtype)
        return True

    def adopt_current(self, model: str, me: dict, peers: Mapping[str, dict], held: set[int]) -> None:
        """Make the current version the one with the newest epoch among the shards, when we hold it."""
        best = None
        for h in peers.values():
            v, e = (h.get("current") or {}).get(model), (h.get("epochs") or {}).get(model, 0)
            if isinstance(v, int) and isinstance(e, int) and (best is None or e > best[0]):
                best = (e, v)
        own_e = (me.get("epochs") or {}).get(model, 0)
        own_v = (me.get("current") or {}).get(model)
        if best is None or not isinstance(own_e, int) or best[0] <= own_e or best[1] == own_v:
            return
        if best[1] in held:
            self.apply.put(("current", model, best[1], best[0]), timeout=5)  # bounded: never stuck on a stopped loop
            self.status["adopted_current"] += 1
            log.info("current_adopted", shard=self.me, model=model, version=best[1], epoch=best[0], was=own_v)

    def _throttle(self, nbytes: int) -> None:
        """Keep repair traffic under max_bytes_per_s (0: unbounded), sleeping in short steps."""
        if self.max_bytes_per_s <= 0:
            return
        self._sent += nbytes
        for _ in range(10000):
            ahead = self._sent / self.max_bytes_per_s - (time.monotonic() - self._sent_at)
            if ahead <= 0 or self.stopping.is_set():
                break
            time.sleep(min(ahead, 0.1))
        if time.monotonic() - self._sent_at > 10:  # a fresh window now and then: idle time is not banked
            self._sent_at, self._sent = time.monotonic(), 0


def _ints(value: object) -> list[int]:
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)] if isinstance(value, list) else []


def _nbytes(item: list) -> int:
    try:
        return (int(item[5]) - int(item[4])) * np.dtype(item[2]).itemsize
    except (TypeError, ValueError):
        return 0


def _batches(items: list[list]) -> list[list[list]]:
    out, cur, size = [], [], 0
    for it in items:
        n = _nbytes(it)
        if cur and size + n > BATCH_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += n
    return out + ([cur] if cur else [])
