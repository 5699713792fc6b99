"""Weight sync thread: follows the parameter servers and hands new weights to the compute thread.

Clone pattern: a SUB socket hears every shard's announcements (commit, rollback, and a
periodic heartbeat with the current state). A sequence gap, a shard restart (new boot id) or
a shard not heard from yet makes the worker ask that shard for a snapshot (hello). A model
switches to version V only when *every* shard says V is current (a half-done publish stays
invisible). Then the pieces are fetched from all shards in parallel, checksummed, assembled
beside the live weights, checked whole against the module and built into a complete new
module here (dtype, int8, device), which the compute thread swaps in between batches.

A version that cannot be assembled or loaded is *refused*: remembered with its reason,
reported in the heartbeat, never fetched again (a newer version is). A fetch that fails for
another reason (a shard slow or gone) is retried with exponential backoff. A shard silent for
longer than a few of its announce intervals is asked for a snapshot, and the SUB follows the
PUB endpoint each snapshot names (a shard restarted on a new port is heard again).
"""
from __future__ import annotations

import hashlib
import threading
import time
from typing import Mapping

import numpy as np
import structlog
import torch
import zmq

from ringserve.protocol.codec import unpack_map
from ringserve.protocol.messages import ProtocolError
from ringserve.protocol.placement import Piece
from ringserve.protocol.security import Security
from ringserve.protocol.shardrpc import ShardCallError, ShardRPC

log = structlog.get_logger("ringserve.worker.sync")

BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 30.0
SILENCE_INTERVALS = 5  # announce intervals without a word before a shard is asked for a snapshot
SILENCE_MIN_S = 2.0  # ... and never less than this (a busy machine delays heartbeats)
POLL_MS = 50  # the loop turns at least this often: an on-demand load waits at most this long to start


def next_backoff(previous: float | None) -> float:
    """Delay before retrying a failed fetch: doubles from BACKOFF_FIRST_S up to BACKOFF_MAX_S."""
    return BACKOFF_FIRST_S if previous is None else min(previous * 2, BACKOFF_MAX_S)


class ShardView:
    def __init__(self) -> None:
        self.boot: str | None = None
        self.seq = -1
        self.current: dict[str, int] = {}
        self.pub: str | None = None
        self.known = False
        self.heard = 0.0  # monotonic time of the last announcement or snapshot
        self.interval = 1.0  # the shard's announce interval (from hello)


class WeightSync(threading.Thread):
    def __init__(self, ctx: zmq.Context, shards: Mapping[str, str], models: Mapping, swaps, on_error=None,
                 timeout: float = 30.0, resync_s: float = 5.0, security: Security | None = None):
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
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                for n, v in self.views.items():
                    if v.known and now - v.heard > max(SILENCE_INTERVALS * v.interval, SILENCE_MIN_S):
                        log.info("shard_silent_resync", shard=n, silent_s=round(now - v.heard, 2))
                        v.known = False
                stale = [n for n, v in self.views.items() if not v.known]
                if stale and now - last_resync >= min(1.0, self.resync_s) or now - last_resync >= self.resync_s:
                    last_resync = now
                    self._snapshot(rpc, stale or list(self.shards))
                for n, v in self.views.items():
                    if v.pub and connected.get(n) != v.pub:
                        if n in connected:
                            _disconnect(sub, connected[n])
                            log.info("shard_pub_moved", shard=n, old=connected[n], new=v.pub)
                        self._connect_sub(sub, n, v.pub)
                        connected[n] = v.pub
                if sub.poll(POLL_MS):
                    for _ in range(100):
                        try:
                            frames = sub.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_announce(frames)
                self._maybe_fetch(rpc)
                self._free_retired()
        finally:
            sub.close(linger=0)
            rpc.close()

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
        if boot != view.boot or seq != expected:
            if view.known:
                log.info("shard_gap_resync", shard=msg.get("shard"), seq=seq, expected=expected)
            view.known = False  # ask for a snapshot rather than trust a partial history
            return
        view.seq = seq
        view.current = dict(msg.get("current", {}))
        view.heard = time.monotonic()

    def _snapshot(self, rpc: ShardRPC, names: list[str]) -> None:
        replies = rpc.call({n: ({"cmd": "hello"}, []) for n in names}, timeout=2.0, raise_on_error=False)
        for n, (h, _) in replies.items():
            try:
                if h.get("ok"):
                    v = self.views[n]
                    boot, seq, current, pub = str(h["boot"]), int(h["seq"]), dict(h["current"]), str(h["pub"])
                    v.boot, v.seq, v.current, v.pub, v.known = boot, seq, current, pub, True
                    v.heard, v.interval = time.monotonic(), float(h.get("announce_interval", 1.0))
                    self.snapshots[n] += 1
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("bad_hello", shard=n, error=str(exc))

    def _maybe_fetch(self, rpc: ShardRPC) -> None:
        if not all(v.known for v in self.views.values()):
            return
        for name, model in self.models.items():
            if getattr(model, "on_demand", False) and not model.ready:
                self.wanted.pop(name, None)  # unloaded (or never loaded): fetched whole when asked for
                self.held.pop(name, None)
                if name not in self.requested:
                    continue
            agreed = {v.current.get(name) for v in self.views.values()}
            if len(agreed) != 1:
                continue  # shards disagree: a publish or rollback is half done; keep what we serve
            version = agreed.pop()
            if not isinstance(version, int) or version == self.wanted.get(name, model.version) \
                    or (name, version) in self.refused:
                continue
            not_before, _ = self.retry.get((name, version), (0.0, None))
            if time.monotonic() < not_before:
                continue
            self._fetch(rpc, name, version)

    def _fetch(self, rpc: ShardRPC, model: str, version: int) -> None:
        """Ask every shard what `version` is made of; fetch only pieces whose checksum we lack;
        build the new module whole; queue it for the compute thread, or refuse the version."""
        t0 = time.monotonic()
        held = self.held.get(model)
        try:
            manifests = {n: h["manifest"] for n, (h, _) in rpc.call_all(
                {"cmd": "fetch", "model": model, "version": version, "manifest_only": True}).items()}
            need = {n: [item[0] for item in items if held is None or held.sums.get(item[0]) != item[6]]
                    for n, items in manifests.items()}
            replies = rpc.call({n: ({"cmd": "fetch", "model": model, "version": version, "keys": keys}, [])
                                for n, keys in need.items() if keys})
        except (ShardCallError, KeyError, TypeError) as exc:
            if "CORRUPT" in str(exc):
                self._refuse(model, version, str(exc))
                return
            _, backoff = self.retry.get((model, version), (0.0, None))
            delay = next_backoff(backoff)
            self.retry[(model, version)] = (time.monotonic() + delay, delay)
            log.warning("weights_fetch_failed", model=model, version=version, error=str(exc), retry_in_s=delay)
            return
        try:
            new = assemble(manifests, replies, held)
            module = self.models[model].build_shadow(new.tensors())  # off the compute thread
        except Exception as exc:  # the version itself is broken: refuse it, keep serving the old one
            self._refuse(model, version, f"{type(exc).__name__}: {exc}")
            return
        self.retry.pop((model, version), None)
        self.requested.discard(model)
        self.held[model] = new
        self.wanted[model] = version
        self.retiring.append(self.models[model].module)  # the compute thread drops its reference, we free it
        self.swaps.put((model, module, version))
        log.info("weights_fetched", model=model, version=version, pieces_fetched=sum(map(len, need.values())),
                 pieces_total=sum(map(len, manifests.values())), seconds=round(time.monotonic() - t0, 3))

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
        log.error("weights_refused", model=model, version=version, reason=reason,
                  serving=self.models[model].version)


def _disconnect(sub: zmq.Socket, endpoint: str) -> None:
    try:
        sub.disconnect(endpoint)
    except zmq.ZMQError:
        pass


class Held:
    """The weights a worker holds, flat per parameter, with the checksum of every piece."""

    def __init__(self) -> None:
        self.flat: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple] = {}
        self.sums: dict[str, str] = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(a.reshape(self.shapes[n])) for n, a in self.flat.items()}


def assemble(manifests: Mapping[str, list], replies: Mapping[str, tuple[dict, list]], held: Held | None) -> Held:
    """Build the new weights beside the live ones: unchanged pieces from `held`, the rest from
    the shards' replies, every received piece checked against its checksum. Parameters with no
    changed piece keep sharing the held array (they are never written to)."""
    pieces = {item[0]: (Piece.from_list(item[:6]), item[6]) for items in manifests.values() for item in items}
    received: dict[str, memoryview] = {}
    for shard, (header, frames) in replies.items():
        items = header.get("pieces", [])
        if len(items) != len(frames):
            raise ValueError(f"shard {shard}: {len(items)} pieces but {len(frames)} frames")
        for item, frame in zip(items, frames):
            buf = frame.buffer
            if hashlib.sha256(buf).hexdigest() != item[6] or pieces.get(item[0], (None, None))[1] != item[6]:
                raise ValueError(f"shard {shard}: piece {item[0]} failed its checksum")
            received[item[0]] = buf
    new = Held()
    by_param: dict[str, list[tuple[Piece, str]]] = {}
    for piece, checksum in pieces.values():
        by_param.setdefault(piece.param, []).append((piece, checksum))
    for param, plist in by_param.items():
        shape, dtype = plist[0][0].shape, plist[0][0].dtype
        numel = int(np.prod(shape))
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
        old = held.flat.get(param) if held else None
        reuse = old is not None and old.size == numel and old.dtype.name == dtype
        if reuse and not any(p.key in received for p, _ in plist):
            arr = old
        else:
            arr = old.copy() if reuse else np.empty(numel, dtype=dtype)
            for p, checksum in plist:
                if p.key in received:
                    arr[p.start:p.stop] = np.frombuffer(received[p.key], dtype=dtype)
                elif not (reuse and held.sums.get(p.key) == checksum):
                    raise ValueError(f"piece {p.key} neither held nor received")
        new.flat[param], new.shapes[param] = arr, shape
        new.sums.update({p.key: c for p, c in plist})
    return new
