"""Weight sync thread: follows the parameter servers and hands new weights to the compute thread.

Clone pattern: a SUB socket hears every shard's announcements (commit, rollback, and a
periodic heartbeat with the current state). A sequence gap, a shard restart (new boot id) or
a shard not heard from yet makes the worker ask that shard for a snapshot (hello). A model
switches to version V only when *every* shard says V is current (a half-done publish stays
invisible). Then the pieces are fetched from all shards in parallel, checksummed, assembled
beside the live weights, and queued for the compute thread, which swaps between batches.
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


class ShardView:
    def __init__(self) -> None:
        self.boot: str | None = None
        self.seq = -1
        self.current: dict[str, int] = {}
        self.pub: str | None = None
        self.known = False


class WeightSync(threading.Thread):
    def __init__(self, ctx: zmq.Context, shards: Mapping[str, str], models: Mapping, swaps, on_error=None,
                 timeout: float = 30.0, resync_s: float = 5.0, security: Security | None = None):
        super().__init__(name="ringserve-weight-sync", daemon=True)
        self.ctx, self.shards, self.models, self.swaps = ctx, dict(shards), models, swaps
        self.timeout, self.resync_s = timeout, resync_s
        self.views = {n: ShardView() for n in self.shards}
        self.wanted: dict[str, int] = {}  # model -> version queued for swap (avoid fetching twice)
        self.refused: dict[tuple[str, int], str] = {}
        self.held: dict[str, Held] = {}  # model -> the weights last fetched (for delta fetches)
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
        connected: set[str] = set()
        last_resync = 0.0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                stale = [n for n, v in self.views.items() if not v.known]
                if stale and now - last_resync >= min(1.0, self.resync_s) or now - last_resync >= self.resync_s:
                    last_resync = now
                    self._snapshot(rpc, stale or list(self.shards))
                for n, v in self.views.items():
                    if v.pub and n not in connected:
                        self._connect_sub(sub, n, v.pub)
                        connected.add(n)
                if sub.poll(200):
                    for _ in range(100):
                        try:
                            frames = sub.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_announce(frames)
                self._maybe_fetch(rpc)
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

    def _snapshot(self, rpc: ShardRPC, names: list[str]) -> None:
        replies = rpc.call({n: ({"cmd": "hello"}, []) for n in names}, timeout=2.0, raise_on_error=False)
        for n, (h, _) in replies.items():
            if h.get("ok"):
                v = self.views[n]
                v.boot, v.seq, v.current, v.pub, v.known = h["boot"], h["seq"], dict(h["current"]), h["pub"], True

    def _maybe_fetch(self, rpc: ShardRPC) -> None:
        if not all(v.known for v in self.views.values()):
            return
        for name, model in self.models.items():
            agreed = {v.current.get(name) for v in self.views.values()}
            if len(agreed) != 1:
                continue  # shards disagree: a publish or rollback is half done; keep what we serve
            version = agreed.pop()
            if version is None or version == self.wanted.get(name, model.version) or (name, version) in self.refused:
                continue
            self._fetch(rpc, name, version)

    def _fetch(self, rpc: ShardRPC, model: str, version: int) -> None:
        """Ask every shard what `version` is made of; fetch only pieces whose checksum we lack."""
        t0 = time.monotonic()
        held = self.held.get(model)
        try:
            manifests = {n: h["manifest"] for n, (h, _) in rpc.call_all(
                {"cmd": "fetch", "model": model, "version": version, "manifest_only": True}).items()}
            need = {n: [item[0] for item in items if held is None or held.sums.get(item[0]) != item[6]]
                    for n, items in manifests.items()}
            replies = rpc.call({n: ({"cmd": "fetch", "model": model, "version": version, "keys": keys}, [])
                                for n, keys in need.items() if keys})
            new = assemble(manifests, replies, held)
        except (ShardCallError, ValueError) as exc:
            log.error("weights_fetch_failed", model=model, version=version, error=str(exc))
            if "CORRUPT" in str(exc) or "checksum" in str(exc):
                self.refused[(model, version)] = str(exc)
            return
        self.held[model] = new
        self.wanted[model] = version
        self.swaps.put((model, new.tensors(), version))
        log.info("weights_fetched", model=model, version=version, pieces_fetched=sum(map(len, need.values())),
                 pieces_total=sum(map(len, manifests.values())), seconds=round(time.monotonic() - t0, 3))


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
        if sum(p.stop - p.start for p, _ in plist) != numel:
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
