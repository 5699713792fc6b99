"""Calling parameter-server shards in parallel: one DEALER per shard, replies matched by rid.

Used by the publisher (client/) and by the worker's weight sync (worker/), whose pipelined
piece fetch (worker/sync.py `fetch_into`) sends on these sockets itself, several requests in
flight, with rids from `next_rid`. A shard that does not answer in time gets a fresh socket
(`reopen`), so nothing queued for it is delivered late.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Mapping, Sequence

import zmq

from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.messages import SHARD_PROTO, ProtocolError
from ringserve.protocol.security import Security


PROGRESS_S = 0.25  # how often a call with a progress callback reports
CANCEL_POLL_S = 0.05  # how often a cancellable call looks at its cancel event


class ShardCallError(RuntimeError):
    """Some shards failed or did not answer; `failures` maps shard name -> reason."""

    def __init__(self, failures: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in sorted(failures.items())))
        self.failures = failures


class ShardRPC:
    def __init__(self, ctx: zmq.Context, shards: Mapping[str, str], timeout: float = 10.0,
                 security: Security | None = None):
        self.ctx, self.shards, self.timeout = ctx, dict(shards), timeout
        self.security = security or Security()
        self.socks: dict[str, zmq.Socket] = {}
        self._rids = itertools.count(1)
        for name in self.shards:
            self._open(name)

    def next_rid(self) -> int:
        return next(self._rids)

    def reopen(self, name: str) -> None:
        """A fresh socket for `name`: replies still owed on the old one are never delivered."""
        self._open(name)

    def _open(self, name: str) -> None:
        old = self.socks.get(name)
        if old is not None:
            old.close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        try:
            self.security.client(sock, "shard", name)
            sock.connect(self.shards[name])
        except Exception:
            sock.close(linger=0)  # never leave a socket open that close() does not know about
            raise
        self.socks[name] = sock

    def call(self, requests: Mapping[str, tuple[dict, Sequence]], timeout: float | None = None,
             raise_on_error: bool = True, progress: Callable[[dict[str, tuple[int, int]]], None] | None = None,
             cancel: threading.Event | None = None, enough: int | None = None,
             grace: float = 0.5) -> dict[str, tuple[dict, list]]:
        """Send each shard its (header, frames) at once; wait for all replies (or the timeout).

        `enough`, if given: once that many shards have answered ok, wait at most `grace` seconds
        more for the others (replicated shards: a dead one does not hold up the rest).

        `progress`, if given, is called about every PROGRESS_S while waiting with {shard: (bytes
        of frames sent, bytes in all)}: each frame is sent tracked, and counts as sent once ZeroMQ
        has handed it to the network. `cancel` set ends the wait at once (a stopping worker), as
        a timeout does."""
        rids = {}
        replies: dict[str, tuple[dict, list]] = {}
        failures: dict[str, str] = {}
        tracked: dict[str, list[tuple[zmq.MessageTracker, int]]] = {}
        for name, (header, frames) in requests.items():
            rids[name] = next(self._rids)
            parts = [SHARD_PROTO, pack({**header, "rid": rids[name]}), *frames]
            if progress is not None:
                parts[2:] = [zmq.Frame(f, track=True) for f in frames]
                tracked[name] = [(f.tracker, len(f.buffer)) for f in parts[2:]]
            try:  # never block: a shard whose queue is full counts as not answering
                self.socks[name].send_multipart(parts, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                failures[name] = "send queue full (shard not reading)"
                self._open(name)
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        poller = zmq.Poller()
        for name in requests:
            poller.register(self.socks[name], zmq.POLLIN)
        waiting = set(requests) - set(failures)
        slice_s = PROGRESS_S if progress is not None else (CANCEL_POLL_S if cancel is not None else None)
        if enough is not None:
            slice_s = min(slice_s or grace, grace)
        while waiting and time.monotonic() < end and not (cancel is not None and cancel.is_set()):
            if enough is not None and len(replies) - len(set(failures) & set(replies)) >= enough:
                end = min(end, time.monotonic() + grace)
                enough = None
            if progress is not None:
                progress(_sent(tracked, replies))
            left = end - time.monotonic()
            for sock, _ in poller.poll(max(1, int(min(left, slice_s or left) * 1000))):
                name = next(n for n in waiting | set(replies) if self.socks[n] is sock)
                frames = sock.recv_multipart(copy=False)
                try:
                    header = unpack_map(frames[1])
                except (ProtocolError, IndexError):
                    continue
                if name not in waiting or header.get("rid") != rids[name]:
                    continue  # a stale reply to an earlier call
                waiting.discard(name)
                replies[name] = (header, frames[2:])
                if not header.get("ok"):
                    failures[name] = str(header.get("error", {}).get("message", header))
        if progress is not None:
            progress(_sent(tracked, replies))
        for name in waiting:
            failures[name] = ("stopping" if cancel is not None and cancel.is_set()
                              else f"no answer in {self.timeout if timeout is None else timeout}s")
            self._open(name)
        if failures and raise_on_error:
            raise ShardCallError(failures)
        return replies

    def call_all(self, header: dict, timeout: float | None = None, raise_on_error: bool = True,
                 cancel: threading.Event | None = None, enough: int | None = None, grace: float = 0.5):
        return self.call({n: (header, []) for n in self.shards}, timeout, raise_on_error, cancel=cancel,
                         enough=enough, grace=grace)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)


def _sent(tracked: Mapping[str, list[tuple[zmq.MessageTracker, int]]], answered: Mapping) -> dict[str, tuple[int, int]]:
    """{shard: (bytes of the frames ZeroMQ is done with, bytes in all)}; all of it for a shard that
    answered (pyzmq marks a tracker done a little after the send, from its own thread)."""
    out = {}
    for n, frames in tracked.items():
        total = sum(size for _, size in frames)
        out[n] = (total if n in answered else sum(size for t, size in frames if t.done), total)
    return out
