"""Weight sync thread: follows the parameter servers and hands new weights to the compute thread.

Clone pattern: a SUB socket hears every shard's announcements (commit, rollback, and a
periodic heartbeat with the current state). A sequence gap, a shard restart (new boot id) or
a shard not heard from yet makes the worker ask that shard for a snapshot (hello). A model
switches to version V only when *every* shard says V is current (a half-done publish stays
invisible). Then the manifests are checked (tiling, shapes the module's) before anything is
allocated, and only the pieces not held (held: the same key, place and checksum) are fetched:
from all shards at once, several requests in flight per shard, each piece received straight
into the new version's arrays beside the live ones (or kept as its frame when it is a whole
tensor), hashed once.
Unchanged tensors are shared with the held version. The result is checked whole against the
module and built into a complete new module here (its tensors are the fetched ones; dtype,
int8, device), which the compute thread swaps in between batches (woken for it).

Prefetch (issue 22): when shards that together name every piece announce one stage (model,
version, token, digest) newer than what is served, its pieces are fetched from the stage
(checked on receipt like any piece) and its module built, off to the side, while the shards
write it to disk; nothing of it is served. Once every shard announces the commit of that
digest, the built module is swapped in with no byte moved again; if the commit is other
content, the fetch plans against the prefetched pieces by checksum (or the held ones), and a
stage aborted or never committed is dropped with nothing refused. An announcement older than
the snapshot held (a hello overtook it) is already in that snapshot and is ignored.

A version that cannot be assembled or loaded is *refused*: remembered with its reason,
reported in the heartbeat, never fetched again while a shard holds it (a newer version is).
A worker that serves nothing yet when the current version is one it refuses serves the newest
committed one it can load instead (`_fallback`: the one current before it, what its peers
serve). Every hello to the shards carries a follower report (what is served, built, refused
here; sent at once after a build or a refusal), from which a publisher learns whether a live
worker took its version. Each step of a load is logged, and every wait ends when stopping.
A fetch that fails for another reason (a shard slow or gone) is retried with exponential
backoff. A shard silent for longer than a few of its announce intervals is asked for a
snapshot, and the SUB follows the PUB endpoint each snapshot names (a shard restarted on a new
port is heard again).

Replicated shards (issue 20): every piece is on R owners, so the worker needs only the shards
that answer, as long as fewer than R are missing (`min_live`): those must agree on the current
version, and their manifests name every piece (a piece several list must be the same). Each
piece is fetched from one of its owners, spread by bytes; a shard that fails, errs, drops its
connection (the socket's monitor says so at once: a killed shard is left in milliseconds) or
stays silent while owing pieces is dropped for this fetch and what it owed is asked of another
owner, without starting over. Silent means: nothing while the other shards of the fetch answered
FAILOVER_REPLIES times over more than FAILOVER_S (a shard left behind by the others), or nothing for
FAILOVER_ALONE_S and FAILOVER_GAPS times the longest reply wait of the fetch; so a machine slow
for everyone does not make a worker drop shards that are merely slow. A shard whose hello reports another R or shard list
is never used (logged as an error).
"""
from __future__ import annotations

import math
import os
import struct
import threading
import time
import warnings
from typing import Mapping

import numpy as np
import structlog
import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from ringserve.protocol.digest import CHECKSUM_FORMS, checksum_matches, is_checksum
from ringserve.protocol.codec import _ITEMSIZE, _NAME, SUPPORTED_DTYPES, pack, unpack_map
from ringserve.protocol.messages import SHARD_PROTO, ProtocolError
from ringserve.protocol.placement import Piece, fingerprint, min_live, model_name_problem, resolve_replicas, ring_problem
from ringserve.protocol.security import Security
from ringserve.protocol.shardrpc import ShardCallError, ShardRPC

log = structlog.get_logger("ringserve.worker.sync")

BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 30.0
SILENCE_INTERVALS = 5  # announce intervals without a word before a shard is asked for a snapshot
SILENCE_MIN_S = 2.0  # ... and never less than this (a busy machine delays heartbeats)
POLL_MS = 50  # the loop turns at least this often: an on-demand load waits at most this long to start
FAILOVER_S = 1.0  # a shard silent while it owes pieces, as others answer FAILOVER_REPLIES times over this long: drop it
FAILOVER_REPLIES = 4
FAILOVER_ALONE_S = 3.0  # silent this long (and FAILOVER_GAPS x the longest reply wait seen): dropped regardless
FAILOVER_GAPS = 4


def next_backoff(previous: float | None) -> float:
    """Delay before retrying a failed fetch: doubles from BACKOFF_FIRST_S up to BACKOFF_MAX_S."""
    return BACKOFF_FIRST_S if previous is None else min(previous * 2, BACKOFF_MAX_S)


class ShardView:
    def __init__(self) -> None:
        self.boot: str | None = None
        self.seq = -1
        self.current: dict[str, int] = {}
        self.versions: dict[str, list[int]] = {}  # committed versions per model (from the last snapshot)
        self.history: dict[str, list[int]] = {}  # earlier current versions per model, oldest first (snapshot)
        self.pub: str | None = None
        self.staged: dict[str, tuple[int, str, str]] = {}  # model -> (version, token, digest) last announced staged
        self.committed: dict[str, tuple[int, str]] = {}  # model -> (version, digest) of its last commit heard
        self.known = False
        self.heard = 0.0  # monotonic time of the last announcement or snapshot
        self.interval = 1.0  # the shard's announce interval (from hello)


class WeightSync(threading.Thread):
    def __init__(self, ctx: zmq.Context, shards: Mapping[str, str], models: Mapping, swaps, on_error=None,
                 timeout: float = 30.0, resync_s: float = 5.0, security: Security | None = None, wake=None,
                 replicas: int | None = None, prefetch: bool = True):
        super().__init__(name="ringserve-weight-sync", daemon=True)
        self.ctx, self.shards, self.models, self.swaps = ctx, dict(shards), models, swaps
        self.timeout, self.resync_s = timeout, resync_s
        self.views = {n: ShardView() for n in self.shards}
        self.wanted: dict[str, int] = {}  # model -> version queued for swap (avoid fetching twice)
        self.refused: dict[tuple[str, int], str] = {}  # never fetched again
        self.retry: dict[tuple[str, int], tuple[float, float]] = {}  # (model, version) -> (not before, backoff)
        self.held: dict[str, Held] = {}  # model -> the weights last fetched (for delta fetches)
        self.snapshots: dict[str, int] = {n: 0 for n in self.shards}  # hello snapshots taken, per shard
        self.retiring: list = []  # modules being replaced: freed here, not on the compute thread
        self.requested: set[str] = set()  # on-demand models asked for and not loaded yet
        self.stopping = threading.Event()
        self.security = security or Security()
        self.wake = wake or (lambda: None)  # tells the compute thread a swap is queued (no idle wait)
        self.name = f"worker-{os.getpid()}"  # how the shards' follower reports name us (the agent sets it)
        self.loaded: dict[str, list[int]] = {}  # model -> versions built here, newest last (reported)
        self.report_due = False  # tell the shards now what we serve (a version was built or refused)
        self.fallbacks: dict[str, int] = {}  # model -> the refused current we serve an older version instead of
        self.replicas = resolve_replicas(replicas, len(self.shards))
        self.ring_fp = fingerprint(self.shards, self.replicas)
        self.quorum = min_live(len(self.shards), self.replicas)  # shards that together name every piece
        self.mismatched: dict[str, str] = {}  # shard -> why its ring differs from ours (never used)
        self.unanswered: dict[str, int] = {}  # shard -> snapshots in a row it did not answer
        self.prefetch = prefetch  # fetch a staged version while the shards write it (served only once committed)
        self.prefetched: dict[str, Prefetched] = {}  # model -> a staged version fetched and checked, not served
        self.prefetch_tried: set[tuple[str, int, str]] = set()  # (model, version, token): never fetched twice

    def _connect_sub(self, sub: zmq.Socket, shard: str, endpoint: str) -> None:
        """One SUB, many shards: each connect takes the server key set just before it."""
        self.security.client(sub, "shard", shard)
        sub.connect(endpoint)

    def run(self) -> None:
        rpc = ShardRPC(self.ctx, self.shards, self.timeout, self.security)
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        connected: dict[str, str] = {}  # shard -> the PUB endpoint the SUB is connected to
        last_resync = 0.0
        log.info("weight_sync_started", shards=sorted(self.shards), models=sorted(self.models))
        try:
            while not self.stopping.is_set():
                heard = self._read_announcements(sub, 0, 1000)  # queued during a fetch: read before any is called silent
                now = time.monotonic()
                for n, v in self.views.items():
                    if v.known and now - v.heard > max(SILENCE_INTERVALS * v.interval, SILENCE_MIN_S):
                        log.info("shard_silent_resync", shard=n, silent_s=round(now - v.heard, 2))
                        v.known = False
                stale = [n for n, v in self.views.items() if not v.known]
                if stale and now - last_resync >= min(1.0, self.resync_s) or now - last_resync >= self.resync_s:
                    last_resync = now
                    self._snapshot(rpc, stale or list(self.shards))
                elif self.report_due:  # a version built or refused: the publisher waits to hear it
                    self._snapshot(rpc, list(self.shards), resync=False)
                for n, v in self.views.items():
                    if v.pub and connected.get(n) != v.pub:
                        if n in connected:
                            _disconnect(sub, connected[n])
                            log.info("shard_pub_moved", shard=n, old=connected[n], new=v.pub)
                        self._connect_sub(sub, n, v.pub)
                        connected[n] = v.pub
                self._read_announcements(sub, 0 if heard else POLL_MS)  # news already read: act on it now
                self._maybe_fetch(rpc)
                self._free_retired()
        finally:
            sub.close(linger=0)
            rpc.close()

    def _read_announcements(self, sub: zmq.Socket, timeout_ms: int, limit: int = 100) -> int:
        """Take in what the SUB holds (at most `limit` messages a call), waiting up to `timeout_ms` for
        the first. Called before the silence check too: a fetch or a build blocks this thread for
        as long as it takes (2 s seen under load), and the heartbeats sent meanwhile are queued,
        not missed; judged before they are read, every shard looked silent and was asked for a
        snapshot, which also forgets the commit digests a prefetch is swapped in by. Returns how
        many were read (the loop then does not wait POLL_MS before acting on them)."""
        if not sub.poll(timeout_ms):
            return 0
        n = 0
        for _ in range(limit):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_announce(frames)
            n += 1
        return n

    def _on_announce(self, frames: list[bytes]) -> None:
        try:
            msg = unpack_map(frames[-1])
        except ProtocolError:
            return
        view = self.views.get(msg.get("shard"))
        if view is None:
            return
        seq, boot = msg.get("seq", 0), msg.get("boot")
        expected = view.seq if msg.get("kind") == "hugz" else view.seq + 1
        if (view.known and boot == view.boot and isinstance(seq, int) and not isinstance(seq, bool)
                and seq < expected):  # sent before the snapshot we hold (queued meanwhile): already in it
            if msg.get("kind") == "staged":
                self._book(view.staged, msg, _staged(msg))  # a snapshot names no stage; a prefetch checks it all
            return
        if boot != view.boot or seq != expected:
            if view.known:
                log.info("shard_gap_resync", shard=msg.get("shard"), seq=seq, expected=expected)
            view.known = False  # ask for a snapshot rather than trust a partial history
            return
        view.seq = seq
        view.current = dict(msg.get("current", {}))
        view.heard = time.monotonic()
        kind = msg.get("kind")
        if kind == "staged":
            self._book(view.staged, msg, _staged(msg))
        elif kind == "commit":
            got = _staged({"token": "-", **msg})
            self._book(view.committed, msg, got and (got[0], got[2]))
        elif kind == "unstaged":  # aborted or expired on that shard: it no longer counts toward a prefetch
            got = _staged({"digest": "-", **msg})
            if got is not None and view.staged.get(msg["model"], (None, None, None))[:2] == got[:2]:
                del view.staged[msg["model"]]
        elif kind != "hugz" and isinstance(msg.get("model"), str):
            view.committed.pop(msg["model"], None)  # a rollback (or anything else): the digest heard is over

    @staticmethod
    def _book(book: dict, msg: Mapping, value) -> None:
        """Note what an announcement says of its model (bounded: at most 256 models a shard)."""
        if value is not None and (len(book) < 256 or msg["model"] in book):
            book[msg["model"]] = value

    def report(self) -> dict:
        """What this worker serves, for the shards' follower books (paramserver/followers.py): per
        model it follows now, the version served, the versions built and those refused here."""
        models = {}
        for name, m in self.models.items():
            if getattr(m, "on_demand", False) and not m.ready and name not in self.requested:
                continue  # an unloaded on-demand model fetches nothing: it has no say on a new version
            if model_name_problem(name) or len(models) >= 256:
                continue  # a name no shard can hold is no model of theirs (the shard's report bounds)
            refused = sorted(v for (mn, v) in self.refused if mn == name)[-16:]
            models[name] = {"version": m.version, "loaded": self.loaded.get(name, [])[-16:], "refused": refused}
        return {"name": self.name, "models": models}

    def _snapshot(self, rpc: ShardRPC, names: list[str], resync: bool = True) -> None:
        """Ask `names` for their state (hello), telling them ours (the follower report). Counted
        in `snapshots` when it is a resync (not when it only carries news of a report)."""
        self.report_due = False
        answering = [n for n in names if not self.unanswered.get(n)]  # a shard down does not hold up the loop
        replies = rpc.call({n: ({"cmd": "hello", "follower": self.report()}, []) for n in names},
                           timeout=2.0 if answering else 0.5, raise_on_error=False, cancel=self.stopping,
                           enough=len(answering) or None, grace=0.3)
        for n in names:
            self.unanswered[n] = 0 if n in replies and replies[n][0].get("ok") else self.unanswered.get(n, 0) + 1
        for n, (h, _) in replies.items():
            try:
                if h.get("ok"):
                    problem = ring_problem(n, h, self.replicas, self.ring_fp)
                    if problem:
                        if self.mismatched.get(n) != problem:
                            log.error("shard_ring_mismatch", shard=n, error=problem)
                        self.mismatched[n] = problem
                        continue
                    self.mismatched.pop(n, None)
                    v = self.views[n]
                    first = not v.known
                    boot, seq, current = str(h["boot"]), int(h["seq"]), dict(h["current"])
                    pub = reachable_pub(str(h["pub"]), self.shards[n])
                    v.versions, v.history = _int_lists(h.get("versions")), _int_lists(h.get("history"))
                    v.boot, v.seq, v.current, v.pub, v.known = boot, seq, current, pub, True
                    v.committed = {}  # a snapshot tells no digest: the next fetch reads the manifests
                    v.heard, v.interval = time.monotonic(), float(h.get("announce_interval", 1.0))
                    self.snapshots[n] += resync
                    if first:
                        log.info("shard_snapshot", shard=n, current={m: current.get(m) for m in self.models})
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("bad_hello", shard=n, error=str(exc))
        self._forget_gone_refusals()

    def _forget_gone_refusals(self) -> None:
        """A refused version that no shard holds any more was reverted: a version published later
        under that number is other content, to be fetched like any new version."""
        if not all(v.known for v in self.views.values()):
            return
        for model, version in list(self.refused):
            if not any(version in v.versions.get(model, []) for v in self.views.values()):
                del self.refused[(model, version)]
                log.info("refusal_forgotten", model=model, version=version, why="no shard holds it any more")

    def _live(self) -> list[ShardView]:
        """The shards heard from lately; None when too few to name every piece."""
        known = [v for v in self.views.values() if v.known]
        return known if len(known) >= self.quorum else None

    def _maybe_fetch(self, rpc: ShardRPC) -> None:
        live = self._live()
        if live is None:
            return
        for name, model in self.models.items():
            if getattr(model, "on_demand", False) and not model.ready:
                self.wanted.pop(name, None)  # unloaded (or never loaded): fetched whole when asked for
                self.held.pop(name, None)
                if name not in self.requested:
                    continue
            agreed = {v.current.get(name) for v in live}
            if len(agreed) != 1:
                continue  # shards disagree: a publish or rollback is half done; keep what we serve
            version = agreed.pop()
            if not isinstance(version, int):
                continue
            model.note_current(version)  # status: a refusal of a version no longer current is over
            if (name, version) in self.refused:
                if self.wanted.get(name, model.version) is not None:
                    continue  # we serve an older version: keep it (the refusal is in our heartbeats)
                older = self._fallback(name, version)
                if older is None:
                    if name in self.requested:
                        # asked to load a version refused before, nothing older to serve: say so again
                        # (it ends the wait of the requests for it at once)
                        self.requested.discard(name)
                        model.refuse(version, self.refused[(name, version)])
                        self.wake()
                    continue
                if self.fallbacks.get(name) != version:
                    self.fallbacks[name] = version
                    log.warning("weights_fallback", model=name, current=version, serving=older,
                                why="the current version was refused here; serving the newest committed one "
                                    "this worker can load")
                version = older
            if version == self.wanted.get(name, model.version):
                continue
            not_before, _ = self.retry.get((name, version), (0.0, None))
            if time.monotonic() < not_before:
                continue
            self._fetch(rpc, name, version)
        if self.prefetch:
            for name in self.models:
                self._drop_unstaged(live, name)
                self._maybe_prefetch(rpc, live, name)

    def _drop_unstaged(self, live: list[ShardView], name: str) -> None:
        """Free a prefetched version no shard stages nor holds as current any more (aborted or
        expired): it would otherwise be kept, unserved, until the model's next commit."""
        pre = self.prefetched.get(name)
        if pre is None or any(v.current.get(name) == pre.version for v in live) or any(
                (st[0], st[2]) == (pre.version, pre.digest) for v in live if (st := v.staged.get(name))):
            return
        del self.prefetched[name]
        log.info("weights_prefetch_dropped", model=name, version=pre.version, why="no shard stages it any more")

    def _maybe_prefetch(self, rpc: ShardRPC, live: list[ShardView], name: str) -> None:
        """Fetch a version the shards announced staged (and hold it checked, unserved) while they
        write it to disk: when enough of them staged one content newer than what we serve or fetch."""
        model = self.models[name]
        if getattr(model, "on_demand", False) and not model.ready:
            return
        votes: dict[tuple[int, str, str], int] = {}
        for v in live:
            if name in v.staged:
                votes[v.staged[name]] = votes.get(v.staged[name], 0) + 1
        ready = [k for k, n in votes.items() if n >= self.quorum]
        if not ready:
            return
        version, token, digest = max(ready)
        ours = self.wanted.get(name, model.version)
        if ((isinstance(ours, int) and version <= ours) or (name, version) in self.refused
                or (name, version, token) in self.prefetch_tried
                or all(v.current.get(name) == version for v in live)):  # committed: the fetch proper takes it
            return
        if len(self.prefetch_tried) >= 1024:
            self.prefetch_tried.clear()
        self.prefetch_tried.add((name, version, token))
        self._prefetch(rpc, name, version, token, digest,
                       [n for n, v in self.views.items() if v.known and v.staged.get(name) == (version, token, digest)])

    def _prefetch(self, rpc: ShardRPC, model: str, version: int, token: str, digest: str, asked: list[str]) -> None:
        """Fetch and check the staged pieces of `version` (the publisher's `token`, content `digest`)
        into a version beside the held one, kept in `prefetched`: nothing is built or served until
        the shards commit it, and a stage that fails or never commits is simply dropped."""
        t0 = time.monotonic()
        stage = {"stage": token, "digest": digest}
        self.prefetched.pop(model, None)
        try:
            replies = rpc.call({n: ({"cmd": "fetch", "model": model, "version": version, "manifest_only": True,
                                     **stage}, []) for n in asked},
                               raise_on_error=False, cancel=self.stopping, enough=self.quorum, grace=0.25)
            manifests = {n: h["manifest"] for n, (h, _) in replies.items() if h.get("ok") and h.get("digest") == digest}
            if len(manifests) < self.quorum or (self.replicas == 1 and len(manifests) < len(self.shards)):
                raise ShardCallError({n: "no staged manifest" for n in asked if n not in manifests})
            new, need = plan_version(manifests, self.held.get(model), _shapes(self.models[model]))
            tm = time.monotonic()
            fetched = fetch_into(rpc, model, version, need, new, self.timeout, cancel=self.stopping,
                                 sources=new.sources, extra=stage)
        except Exception as exc:  # noqa: BLE001 - nothing is lost: the commit, if it comes, is fetched as ever
            log.info("weights_prefetch_failed", model=model, version=version, error=str(exc)[:300],
                     seconds=round(time.monotonic() - t0, 3))
            return
        t1 = time.monotonic()
        try:  # built off to the side as after a commit; only a commit of this content swaps it in
            module = self.models[model].build_shadow(new.tensors(), version)
        except Exception as exc:  # noqa: BLE001 - a version that does not load is refused after its commit
            log.info("weights_prebuild_failed", model=model, version=version, error=str(exc)[:300])
            module = None
        self.prefetched[model] = Prefetched(version, digest, new, manifests, module)
        log.info("weights_prefetched", model=model, version=version, bytes_fetched=fetched,
                 seconds=round(time.monotonic() - t0, 3), manifest_s=round(tm - t0, 3), transfer_s=round(t1 - tm, 3),
                 build_s=round(time.monotonic() - t1, 3))

    def _committed_as(self, model: str, version: int, digest: str) -> bool:
        """Every shard heard from says, in its commit announcement, that `version` of `model` is
        current with content `digest`."""
        known = [v for v in self.views.values() if v.known]
        return len(known) >= self.quorum and all(
            v.current.get(model) == version and v.committed.get(model) == (version, digest) for v in known)

    def _fallback(self, model: str, current: int) -> int | None:
        """The version to serve when the shards' current one is refused here and nothing is served
        yet: the one current most recently before it (what peers that refused it still serve), else
        the newest older committed one; held by every shard and not refused here."""
        views = [self.views[n] for n in sorted(self.views) if self.views[n].known]
        common = set.intersection(*(set(v.versions.get(model, [])) for v in views)) if views else set()
        history = views[0].history.get(model, []) if views else []
        candidates = [v for v in reversed(history) if v != current] + sorted((v for v in common if v < current),
                                                                                 reverse=True)
        return next((v for v in candidates if v in common and (model, v) not in self.refused), None)

    def _fetch(self, rpc: ShardRPC, model: str, version: int) -> None:
        """Ask every shard what `version` is made of; fetch only pieces whose checksum we lack,
        from all shards at once (several requests in flight per shard), straight into the new
        version's arrays beside the live ones; build the new module whole; queue it for the
        compute thread, or refuse the version."""
        t0 = time.monotonic()
        held = self.held.get(model)
        served = self.models[model]
        pre = self.prefetched.pop(model, None)
        if pre is not None and pre.version != version:
            pre = None
        # the staged manifests are the committed ones when every shard announced this content's commit
        known = pre is not None and self._committed_as(model, version, pre.digest)
        log.info("weights_fetch_started", model=model, version=version, serving=served.version,
                 prefetched=pre is not None, manifests_known=known)
        try:
            if known:
                manifests = pre.manifests
            else:
                asked = sorted(n for n, v in self.views.items() if v.known)
                replies = rpc.call({n: ({"cmd": "fetch", "model": model, "version": version, "manifest_only": True},
                                        []) for n in asked}, raise_on_error=False, cancel=self.stopping,
                                   enough=self.quorum, grace=0.25)
                manifests = {n: h["manifest"] for n, (h, _) in replies.items() if h.get("ok")}
                if len(manifests) < self.quorum or (self.replicas == 1 and len(manifests) < len(self.shards)):
                    why = {n: str((h.get("error") or {}).get("message", "failed"))[:300]
                           for n, (h, _) in replies.items() if not h.get("ok")}
                    why.update({n: "no answer" for n in self.shards if n not in replies})
                    raise ShardCallError(why)
                if pre is not None and not all(replies[n][0].get("digest") == pre.digest for n in manifests):
                    pre = None  # other content under this number (another publisher won): fetched as ever
        except (ShardCallError, KeyError, TypeError, AttributeError) as exc:
            self._fetch_failed(model, version, exc)
            return
        if pre is not None:
            held = pre.held  # its pieces were checked on receipt; the manifests below still decide each one
        try:
            if known:  # planned (and checked against the module) from these very manifests when prefetched
                new, need = pre.held, {}
            else:
                new, need = plan_version(manifests, held, _shapes(served))
            t1 = time.monotonic()
            log.info("weights_manifest_fetched", model=model, version=version,
                     pieces_total=sum(map(len, manifests.values())), pieces_to_fetch=sum(map(len, need.values())),
                     bytes_to_fetch=sum(_nbytes(p) for items in need.values() for p, _ in items),
                     per_shard={n: len(items) for n, items in need.items()}, seconds=round(t1 - t0, 3))
            fetched = fetch_into(rpc, model, version, need, new, self.timeout, cancel=self.stopping,
                                 sources=new.sources)
            t2 = time.monotonic()
            log.info("weights_pieces_fetched", model=model, version=version, bytes_fetched=fetched,
                     seconds=round(t2 - t1, 3))
        except ShardCallError as exc:
            self._fetch_failed(model, version, exc)
            return
        except Exception as exc:  # the version itself is broken: refuse it, keep serving the old one
            self._refuse(model, version, f"{type(exc).__name__}: {exc}")
            return
        try:
            if (pre is not None and pre.module is not None and set(new.flat) == set(pre.held.flat)
                    and all(a is pre.held.flat[k] for k, a in new.flat.items())):
                module = pre.module  # built from exactly these arrays when they were fetched
            else:
                module = served.build_shadow(new.tensors(), version)  # off the compute thread, with its stages
        except Exception as exc:  # the version itself is broken: refuse it, keep serving the old one
            self._refuse(model, version, f"{type(exc).__name__}: {exc}")
            return
        log.info("weights_built", model=model, version=version, seconds=round(time.monotonic() - t2, 3))
        self.retry.pop((model, version), None)
        self.requested.discard(model)
        self.held[model] = new
        self.wanted[model] = version
        self.loaded[model] = [v for v in self.loaded.get(model, []) if v != version][-15:] + [version]
        self.report_due = True
        self.retiring.append(served.module)  # the compute thread drops its reference, we free it
        self.swaps.put((model, module, version))
        self.wake()
        t3 = time.monotonic()
        log.info("weights_fetched", model=model, version=version, pieces_fetched=sum(map(len, need.values())),
                 pieces_total=sum(map(len, manifests.values())), bytes_fetched=fetched,
                 seconds=round(t3 - t0, 3), manifest_s=round(t1 - t0, 3), transfer_s=round(t2 - t1, 3),
                 build_s=round(t3 - t2, 3))

    def _fetch_failed(self, model: str, version: int, exc: Exception) -> None:
        """A shard slow, gone or failing: try again later (exponential backoff)."""
        if self.stopping.is_set():
            return
        if "CORRUPT" in str(exc):
            self._refuse(model, version, str(exc))
            return
        _, backoff = self.retry.get((model, version), (0.0, None))
        delay = next_backoff(backoff)
        self.retry[(model, version)] = (time.monotonic() + delay, delay)
        log.warning("weights_fetch_failed", model=model, version=version, error=str(exc), retry_in_s=delay)

    def request(self, model: str) -> None:
        """Load an on-demand model (any thread may call this; a set add is atomic)."""
        self.requested.add(model)

    def _free_retired(self) -> None:
        """Drop modules the compute thread has swapped out: freeing ~100 MB takes milliseconds,
        which would otherwise be spent on the compute thread between two batches."""
        if self.retiring:
            live = [m.module for m in self.models.values()]
            self.retiring = [r for r in self.retiring if any(r is m for m in live)]

    def _refuse(self, model: str, version: int, reason: str) -> None:
        self.refused[(model, version)] = reason
        self.retry.pop((model, version), None)
        self.models[model].refuse(version, reason)
        self.wake()  # requests waiting for an on-demand load of it are answered at once
        self.report_due = True
        log.error("weights_refused", model=model, version=version, reason=reason,
                  serving=self.models[model].version)


def _int_lists(value: object) -> dict[str, list[int]]:
    """{model: [int, ...]} from a shard's hello (versions, history); anything else left out."""
    if not isinstance(value, dict):
        return {}
    return {m: [v for v in vs if isinstance(v, int) and not isinstance(v, bool)][-64:]
            for m, vs in value.items() if isinstance(m, str) and isinstance(vs, list)}


def _nbytes(p: Piece) -> int:
    return (p.stop - p.start) * _itemsize(p.dtype)


def _itemsize(dtype: str) -> int:
    """codec's table for the wire's dtypes (no numpy dtype built per tensor); numpy for any other
    name, which `_item` refuses before it is used."""
    size = _ITEMSIZE.get(dtype)
    return size if size is not None else np.dtype(dtype).itemsize


def reachable_pub(announced: str, command: str) -> str:
    """Where to subscribe to a shard's announcements. A shard bound to every address (0.0.0.0, *,
    ::) announces that wildcard, which means "here" only on its own host: take the host this
    worker reaches the shard's command socket at, and the announced port."""
    if not announced.startswith("tcp://"):
        return announced
    host, _, port = announced[len("tcp://"):].rpartition(":")
    if host not in ("0.0.0.0", "*", "::", "[::]", ""):
        return announced
    reached = command[len("tcp://"):].rpartition(":")[0] if command.startswith("tcp://") else ""
    return f"tcp://{reached}:{port}" if reached else announced


def _disconnect(sub: zmq.Socket, endpoint: str) -> None:
    try:
        sub.disconnect(endpoint)
    except zmq.ZMQError:
        pass


def _staged(msg: Mapping) -> tuple[int, str, str] | None:
    """(version, token, digest) of a shard's "staged" announcement, or None if it is not well formed."""
    version, token, digest = msg.get("version"), msg.get("token"), msg.get("digest")
    if (not isinstance(msg.get("model"), str) or model_name_problem(msg["model"])
            or not isinstance(version, int) or isinstance(version, bool) or version < 0
            or not isinstance(token, str) or not 1 <= len(token) <= 64
            or not isinstance(digest, str) or not 1 <= len(digest) <= 128):
        return None
    return version, token, digest


class Prefetched:
    """A staged version fetched (every piece checked) before its commit: the base the fetch of
    that version plans against once the shards commit it with the same digest."""

    def __init__(self, version: int, digest: str, held: "Held", manifests: dict, module=None) -> None:
        self.version, self.digest, self.held, self.manifests, self.module = version, digest, held, manifests, module


class Held:
    """The weights a worker holds, flat per parameter, with the checksum of every piece. The
    arrays are never written once a version is built: the next version shares the ones it does
    not change (and a module built with them may use them as its own tensors)."""

    def __init__(self) -> None:
        self.flat: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple] = {}
        self.sources: dict[str, list[str]] = {}  # piece key -> the shards whose manifest lists it (owners)
        # piece key -> (its manifest entry as checked, the Piece, its checksum): the next version's
        # plan takes an entry equal to one of these, value for value and type for type, as checked
        self.entries: dict[str, tuple[list, Piece, str]] = {}
        self.counts: dict[str, int] = {}  # param -> how many pieces it was planned from
        # param -> (its flat array, the tensor `tensors` gave for it): a version sharing the array
        # gives the same tensor object, so the worker's build keeps what it built from it
        self.views: dict[str, tuple[np.ndarray, torch.Tensor]] = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        with warnings.catch_warnings():  # a received frame may be read-only: nobody writes to these
            warnings.simplefilter("ignore", UserWarning)
            for n, a in self.flat.items():
                view = self.views.get(n)
                if view is None or view[0] is not a:
                    view = self.views[n] = (a, torch.from_numpy(a).reshape(self.shapes[n]))
                out[n] = view[1]
        return out


MAX_EXTRA_BYTES = 256 << 20  # tensors a version carries that the module does not hold (ignored keys)
FETCH_WINDOW = 3  # fetch requests in flight per shard
FETCH_BATCH_BYTES = 8 << 20  # bytes asked for per fetch request (at least one piece)


def _shapes(served) -> dict[str, tuple] | None:
    layout = getattr(served, "layout", None)
    return {k: tuple(shape) for k, (shape, _dtype) in layout.items()} if layout else None


def _item(item: object) -> tuple[Piece, str]:
    """One manifest entry [key, param, dtype, shape, start, stop, checksum] from a shard, validated
    (a checksum of a digest this worker knows: protocol/digest.py)."""
    if not isinstance(item, list) or len(item) != 7 or not isinstance(item[6], str):
        raise ValueError(f"bad manifest entry {str(item)[:120]}")
    if not is_checksum(item[6]):
        raise ValueError(f"piece {str(item[0])[:80]}: checksum {item[6][:80]!r} is not {CHECKSUM_FORMS}")
    try:
        piece = Piece.from_list(item[:6])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad manifest entry {str(item)[:120]}: {exc}") from None
    if piece.dtype not in SUPPORTED_DTYPES or len(piece.shape) > 8 or any(d < 0 for d in piece.shape):
        raise ValueError(f"piece {piece.key}: dtype {piece.dtype} or shape {list(piece.shape)} not supported")
    return piece, item[6]


def _same_entry(checked: list, item: list) -> bool:
    """Whether `item` is, value for value and type for type (1 is not 1.0 nor True), the manifest
    entry `checked` that _item already validated (the shape's dimensions too)."""
    if item != checked:  # one C-level comparison of the values (1 == 1.0 == True: the types below)
        return False
    # equal values: a string equals only a string, and a list only a list; a number may be another
    # number's type, so those (start, stop, the shape's dimensions) are compared type for type
    return (type(item[4]) is type(checked[4]) and type(item[5]) is type(checked[5])
            and (not isinstance(item[3], list) or list(map(type, item[3])) == list(map(type, checked[3]))))


def plan_version(manifests: Mapping[str, list], held: Held | None, shapes: Mapping[str, tuple] | None = None
                 ) -> tuple[Held, dict[str, list[tuple[Piece, str]]]]:
    """Check what the shards say a version is made of (every tensor tiled exactly by its pieces,
    one dtype and shape; shapes the module's, when `shapes` is given) and lay out the new version
    beside the held one: parameters with no changed piece share the held array; the others get
    a fresh array, with the unchanged pieces copied from the held one. Returns (the new version,
    per shard the pieces to fetch into it)."""
    pieces: dict[str, tuple[Piece, str]] = {}
    sources: dict[str, list[str]] = {}
    raw: dict[str, list] = {}  # key -> the entry as first listed: another owner's equal entry is not parsed again
    entries = held.entries if held is not None else {}  # the held version's entries, checked: not parsed again
    reused: dict[str, int] = {}  # param -> how many of its pieces are the held version's entries
    for shard, items in sorted(manifests.items()):
        if not isinstance(items, list):
            raise ValueError(f"shard {shard}: manifest is not a list")
        for item in items:
            if isinstance(item, list) and item and type(item[0]) is str:
                if item[0] in raw:
                    if _same_entry(raw[item[0]], item) and shard not in sources[item[0]]:
                        sources[item[0]].append(shard)  # the same entry, already checked: this owner holds it too
                        continue
                elif (known := entries.get(item[0])) is not None and _same_entry(known[0], item):
                    raw[item[0]], pieces[item[0]], sources[item[0]] = known[0], (known[1], known[2]), [shard]
                    reused[known[1].param] = reused.get(known[1].param, 0) + 1
                    continue  # the held version's entry: checked when it was planned
            piece, checksum = _item(item)
            raw.setdefault(piece.key, item)
            if piece.key in pieces:
                if pieces[piece.key] != (piece, checksum) or shard in sources[piece.key]:
                    raise ValueError(f"piece {piece.key}: shards {sources[piece.key][0]} and {shard} list it "
                                     f"differently (or twice)")
                sources[piece.key].append(shard)
            else:
                pieces[piece.key], sources[piece.key] = (piece, checksum), [shard]
    load: dict[str, int] = {n: 0 for n in manifests}

    def source(key: str) -> str:
        """The owner to fetch `key` from: the one with the fewest bytes asked of it so far."""
        n = min(sources[key], key=lambda s: (load[s], s))
        load[n] += _nbytes(pieces[key][0])
        return n
    by_param: dict[str, list[tuple[Piece, str]]] = {}
    for piece, checksum in pieces.values():
        by_param.setdefault(piece.param, []).append((piece, checksum))
    new = Held()
    new.entries = {k: (raw[k], p, c) for k, (p, c) in pieces.items()}
    need: dict[str, list[tuple[Piece, str]]] = {n: [] for n in manifests}
    extra = 0
    for param, plist in sorted(by_param.items()):
        shape, dtype = plist[0][0].shape, plist[0][0].dtype
        numel = math.prod(shape)  # exact (Python ints; 1 for a scalar): np.prod cost 0.3 ms a plan here
        if shapes is not None:
            if param in shapes and tuple(shapes[param]) != tuple(shape):
                raise ValueError(f"tensor {param}: shape {list(shape)}, the module has {list(shapes[param])}")
            if param not in shapes:
                extra += numel * _itemsize(dtype)
                if extra > MAX_EXTRA_BYTES:
                    raise ValueError(f"more than {MAX_EXTRA_BYTES >> 20} MiB of tensors the module does not hold")
        old = held.flat.get(param) if held else None
        new.counts[param] = len(plist)
        if (old is not None and reused.get(param) == len(plist) == held.counts.get(param)
                and old.size == numel and shape == held.shapes.get(param)):
            # every piece is an entry the held version was planned from, and it had no other: the
            # tiling was checked then, the checksums are the held ones, so the array is shared
            new.flat[param], new.shapes[param] = old, shape
            if param in held.views:
                new.views[param] = held.views[param]  # and so is its tensor
            continue
        if any(p.shape != shape or p.dtype != dtype for p, _ in plist):
            raise ValueError(f"tensor {param}: the shards disagree on its shape or dtype")
        plist.sort(key=lambda pc: pc[0].start)
        edge = 0
        for p, _ in plist:  # pieces must tile [0, numel) exactly: no gap, no overlap
            if p.start != edge or p.stop < p.start:
                raise ValueError(f"tensor {param}: the shards' pieces do not tile its {numel} elements "
                                 f"(gap or overlap at {edge})")
            edge = p.stop
        if edge != numel:
            raise ValueError(f"tensor {param}: the shards' pieces do not cover its {numel} elements")
        reuse = old is not None and old.size == numel and (_NAME.get(old.dtype) or old.dtype.name) == dtype
        # a piece is the held one only if the held piece of its key had its checksum *and* its place:
        # a publish with another --chunk-bytes gives a key another range, where the held bytes differ
        kept = held.entries if reuse else {}
        changed = [(p, c) for p, c in plist if not ((e := kept.get(p.key)) is not None and e[2] == c
                                                    and e[1].start == p.start and e[1].stop == p.stop
                                                    and e[1].param == p.param)]
        if not changed:
            arr = old  # shared with the held version, never written
            if param in held.views and shape == held.shapes.get(param):
                new.views[param] = held.views[param]  # and so is its tensor
        elif len(plist) == 1:
            arr = None  # one piece, the whole tensor: its received frame becomes the array (no copy)
            need[source(plist[0][0].key)].append(plist[0])
        else:
            arr = np.empty(numel, dtype=dtype)
            for p, c in plist:
                if (p, c) not in changed:
                    arr[p.start:p.stop] = old[p.start:p.stop]
            for p, c in changed:
                need[source(p.key)].append((p, c))
        new.flat[param], new.shapes[param] = arr, shape
    new.sources = sources
    return new, {n: items for n, items in need.items() if items}


def _batches(items: list[tuple[Piece, str]], batch_bytes: int) -> list[list[tuple[Piece, str]]]:
    out, cur, size = [], [], 0
    for p, c in items:
        n = (p.stop - p.start) * np.dtype(p.dtype).itemsize
        if cur and size + n > batch_bytes:
            out.append(cur)
            cur, size = [], 0
        cur.append((p, c))
        size += n
    return out + ([cur] if cur else [])


def _own(buf, dtype: str) -> np.ndarray:
    """A received buffer as a flat array: the buffer itself, or a copy if it is not aligned for `dtype`."""
    arr = np.frombuffer(buf, dtype=dtype)
    return arr if arr.flags.aligned else arr.copy()


def _drain(sock: zmq.Socket) -> None:
    """Discard the rest of a multipart message."""
    for _ in range(1 << 20):  # bounded: a message has at most this many parts we would read
        if not sock.getsockopt(zmq.RCVMORE):
            return
        sock.recv(copy=False)


def _recv_batch(sock: zmq.Socket, shard: str, expected: dict[int, dict[str, tuple[Piece, str]]],
                new: Held, done: set | None = None) -> int | None:
    """Read one fetch reply: each piece straight into its place in the new version's arrays
    (recv_into, no intermediate buffer), then checked against its checksum. A stale or garbled
    reply is dropped (None); an error reply raises ShardCallError; a reply whose pieces are not
    exactly those asked for, or fail their checksum, raises ValueError. Returns bytes received."""
    if sock.recv(copy=False).bytes != SHARD_PROTO or not sock.getsockopt(zmq.RCVMORE):
        _drain(sock)
        return None
    try:
        header = unpack_map(sock.recv(copy=False))
    except ProtocolError:
        _drain(sock)
        return None
    batch = expected.pop(header.get("rid"), None) if isinstance(header.get("rid"), int) else None
    if batch is None:  # a stale reply to a request given up on
        _drain(sock)
        return None
    if not header.get("ok"):
        _drain(sock)
        err = header.get("error") if isinstance(header.get("error"), dict) else {}
        raise ShardCallError({shard: str(err.get("message", "fetch failed"))[:500]})
    items = header.get("pieces")
    if not isinstance(items, list) or len(items) != len(batch):
        _drain(sock)
        raise ValueError(f"shard {shard}: sent {len(items) if isinstance(items, list) else 'no'} pieces, "
                         f"asked for {len(batch)}")
    got_bytes = 0
    for item in items:
        key = item[0] if isinstance(item, list) and item else None
        want = batch.pop(key, None) if isinstance(key, str) else None
        if want is None or item != [*want[0].as_list(), want[1]]:
            _drain(sock)
            raise ValueError(f"shard {shard}: sent piece {str(key)[:80]!r}, not one asked for")
        if not sock.getsockopt(zmq.RCVMORE):
            raise ValueError(f"shard {shard}: piece {key} has no frame")
        piece, checksum = want
        whole = new.flat[piece.param] is None
        if whole:  # the frame's own buffer becomes the tensor's memory: no copy
            frame = sock.recv(copy=False)
            dst, n = frame.buffer, len(frame.buffer)
            expect = (piece.stop - piece.start) * np.dtype(piece.dtype).itemsize
        else:  # a piece of a larger tensor: straight into its place
            dst = memoryview(new.flat[piece.param][piece.start:piece.stop]).cast("B")
            n, expect = sock.recv_into(dst), dst.nbytes
        if n != expect:
            _drain(sock)
            raise ValueError(f"shard {shard}: piece {key} is {n} bytes, expected {expect}")
        if not checksum_matches(dst, checksum):
            _drain(sock)
            raise ValueError(f"shard {shard}: piece {key} failed its checksum"
                             + ("" if is_checksum(checksum) else f" (not {CHECKSUM_FORMS})"))
        if whole:
            new.flat[piece.param] = _own(dst, piece.dtype)
        if done is not None:
            done.add(piece.key)
        got_bytes += n
    if sock.getsockopt(zmq.RCVMORE):
        _drain(sock)
        raise ValueError(f"shard {shard}: more frames than pieces")
    return got_bytes


def fetch_into(rpc: ShardRPC, model: str, version: int, need: Mapping[str, list[tuple[Piece, str]]], new: Held,
               timeout: float, window: int = FETCH_WINDOW, batch_bytes: int = FETCH_BATCH_BYTES,
               cancel: threading.Event | None = None, sources: Mapping[str, list[str]] | None = None,
               failover_s: float = FAILOVER_S, extra: Mapping | None = None) -> int:
    """Fetch `need` from every shard at once, `window` requests of about `batch_bytes` in flight
    per shard, each reply read straight into `new`.

    `sources` (piece key -> every owner that has it): a shard that fails, sends something
    wrong, loses its connection (socket monitor), or is silent while owing pieces (for
    `failover_s` since the others answered again, FAILOVER_REPLIES times, or for FAILOVER_ALONE_S and
    FAILOVER_GAPS x the longest reply wait of this fetch) is dropped, and what it still owes is
    asked of the other owners (fewest bytes first), the pieces already received kept.
    Raises ShardCallError when a shard fails or answers none of what is owed for `timeout`
    seconds and no other owner is left (its socket is replaced: late replies are never read),
    ValueError when a shard sends something other than what was asked or a piece fails its
    checksum and no other owner has it. Returns the bytes received."""
    sources = sources or {}
    todo: dict[str, list[list[tuple[Piece, str]]]] = {}
    inflight: dict[str, dict[int, dict[str, tuple[Piece, str]]]] = {}
    assigned: dict[str, list[tuple[Piece, str]]] = {}
    heard: dict[str, float] = {}
    dropped: set[str] = set()
    done: set[str] = set()
    poller = zmq.Poller()
    names: dict[zmq.Socket, str] = {}
    monitors: dict[str, zmq.Socket] = {}  # shard -> its socket's monitor (disconnects), when failing over is possible
    watched: dict[zmq.Socket, str] = {}
    longest = [0.0]  # the longest wait for a reply (from a request owed, or the previous reply) in this fetch
    times: list[float] = []  # when each reply of this fetch was read
    mark: dict[str, int] = {}  # shard -> len(times) when it was last heard (or first owed)
    received = 0

    def add(n: str, items: list[tuple[Piece, str]]) -> None:
        if n not in todo:
            todo[n], inflight[n], assigned[n] = [], {}, []
            poller.register(rpc.socks[n], zmq.POLLIN)
            names[rpc.socks[n]] = n
            if sources:
                try:
                    mon = rpc.socks[n].get_monitor_socket(zmq.EVENT_DISCONNECTED)
                except zmq.ZMQError as exc:  # no monitor: silence still moves the pieces, later
                    log.warning("fetch_monitor_unavailable", shard=n, error=str(exc))
                else:
                    monitors[n], watched[mon] = mon, n
                    poller.register(mon, zmq.POLLIN)
        todo[n] += _batches(list(items), batch_bytes)
        assigned[n] += list(items)

    def unwatch(n: str) -> None:
        mon = monitors.pop(n, None)
        if mon is not None:
            poller.unregister(mon)
            watched.pop(mon, None)
            try:
                rpc.socks[n].disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(linger=0)

    def send(n: str) -> None:
        while todo[n] and len(inflight[n]) < window:
            batch, rid = todo[n][0], rpc.next_rid()
            header = {"cmd": "fetch", "model": model, "version": version, "keys": [p.key for p, _ in batch],
                      "rid": rid, **(extra or {})}
            try:  # never block: a shard whose queue is full counts as failing
                rpc.socks[n].send_multipart([SHARD_PROTO, pack(header)], zmq.NOBLOCK)
            except zmq.Again:
                raise ShardCallError({n: "send queue full (shard not reading)"}) from None
            if not inflight[n]:
                heard[n], mark[n] = time.monotonic(), len(times)  # the silence clock starts with the first request owed
            todo[n].pop(0)
            inflight[n][rid] = {p.key: (p, c) for p, c in batch}

    def movable(n: str) -> bool:
        owed = [p.key for p, _ in assigned[n] if p.key not in done]
        return all(any(s not in dropped and s != n for s in sources.get(k, [])) for k in owed)

    def fail_over(n: str, why: str) -> None:
        """Drop `n` for this fetch; ask the other owners for what it still owes."""
        owed = [(p, c) for p, c in assigned[n] if p.key not in done]
        dropped.add(n)
        unwatch(n)
        poller.unregister(rpc.socks[n])
        names.pop(rpc.socks[n], None)
        rpc.reopen(n)  # nothing it still owes is read later
        todo[n], inflight[n], assigned[n] = [], {}, []
        load = {s: sum(_nbytes(p) for p, _ in assigned.get(s, []) if p.key not in done) for s in todo}
        moved: dict[str, list[tuple[Piece, str]]] = {}
        for p, c in owed:
            alts = [s for s in sources.get(p.key, []) if s not in dropped]
            pick = min(alts, key=lambda s: (load.get(s, 0), s))
            load[pick] = load.get(pick, 0) + _nbytes(p)
            moved.setdefault(pick, []).append((p, c))
        log.warning("weights_fetch_failover", model=model, version=version, shard=n, why=why[:300],
                    pieces_moved={s: len(v) for s, v in moved.items()})
        for s, items in moved.items():
            add(s, items)
            send(s)

    try:
        for n, items in need.items():
            if items:
                add(n, items)
        for n in list(todo):
            send(n)
        deadline = time.monotonic() + timeout
        while any(inflight.values()):
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                raise ShardCallError({n: f"no answer in {timeout}s" for n, f in inflight.items() if f})
            if cancel is not None and cancel.is_set():
                raise ShardCallError({n: "stopping" for n, f in inflight.items() if f})
            alone = max(FAILOVER_ALONE_S, failover_s, FAILOVER_GAPS * longest[0])
            for n in [n for n, f in inflight.items() if f and now - heard.get(n, now) > failover_s]:
                behind = times[mark[n]:]  # the others' replies since n was last heard
                left_behind = len(behind) >= FAILOVER_REPLIES and now - behind[0] > failover_s
                if (left_behind or now - heard[n] > alone) and movable(n):
                    fail_over(n, f"silent for {now - heard[n]:.1f}s while the others answered {len(behind)} times")
            for sock, _ in poller.poll(max(1, int(min(left, POLL_MS / 1000) * 1000))):
                if sock in watched:
                    n = watched[sock]
                    lost = _disconnected(sock)
                    if lost and n not in dropped and inflight.get(n) and movable(n):
                        fail_over(n, "connection lost")
                    continue
                n = names.get(sock)
                if n is None:
                    continue
                try:
                    got = _recv_batch(sock, n, inflight[n], new, done)
                except (ShardCallError, ValueError) as exc:
                    if not sources or not movable(n):
                        raise
                    fail_over(n, str(exc))
                    continue
                if got is None:
                    continue  # stale or garbled: no progress, the deadline stands
                received += got
                longest[0] = max(longest[0], time.monotonic() - heard.get(n, now))
                times.append(time.monotonic())
                mark[n] = len(times)
                heard[n] = deadline = time.monotonic()
                deadline += timeout  # progress: the timeout is for silence
                send(n)
    finally:
        for n in list(monitors):
            unwatch(n)
        for n, f in inflight.items():
            if f:
                rpc.reopen(n)  # nothing still owed is read later by someone else
    missing = sorted(k for k, a in new.flat.items() if a is None)
    if missing:
        raise ValueError(f"tensor {missing[0]} neither held nor received")
    return received


def _disconnected(mon: zmq.Socket) -> bool:
    """Read what a socket monitor has queued; True if it says the connection dropped."""
    lost = False
    for _ in range(64):  # bounded: a monitor queues a few events at most
        try:
            frames = mon.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        try:
            lost |= parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED
        except (ValueError, KeyError, IndexError, struct.error):
            continue
    return lost


def assemble(manifests: Mapping[str, list], replies: Mapping[str, tuple[dict, list]], held: Held | None) -> Held:
    """Build a version from the shards' manifests and whole fetch replies (one per shard), as
    `plan_version` + `fetch_into` do piece by piece: unchanged pieces from `held`, the rest from
    the replies, every received piece checked against its checksum."""
    new, need = plan_version(manifests, held)
    wanted = {p.key: (p, c) for items in need.values() for p, c in items}
    for shard, (header, frames) in replies.items():
        items = header.get("pieces", [])
        if len(items) != len(frames):
            raise ValueError(f"shard {shard}: {len(items)} pieces but {len(frames)} frames")
        for item, frame in zip(items, frames, strict=True):
            buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
            want = wanted.get(item[0]) if isinstance(item, list) and item else None
            if want is None:
                continue  # a piece we hold already
            if want[1] != item[6] or not checksum_matches(buf, item[6]):
                raise ValueError(f"shard {shard}: piece {item[0]} failed its checksum")
            p = want[0]
            if new.flat[p.param] is None:
                new.flat[p.param] = _own(buf, p.dtype)
            else:
                new.flat[p.param][p.start:p.stop] = np.frombuffer(buf, dtype=p.dtype)
            del wanted[item[0]]
    if wanted:
        raise ValueError(f"piece {sorted(wanted)[0]} neither held nor received")
    return new
