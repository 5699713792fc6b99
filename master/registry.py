"""The master's records: workers, requests, per-model queues, de-duplication.

Plain data, no sockets: the broker mutates these in its one loop.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class WorkerRecord:
    ident: bytes
    name: str
    models: dict[str, dict]  # model -> {"version", "ready", "dtype", "quantize", ...}
    credit: int
    device: str
    pid: int | None
    weight: float = 1.0
    state: str = "ready"  # ready | draining ("busy" is derived from in_flight)
    in_flight: dict[str, int] = field(default_factory=dict)  # rid -> attempt
    done: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    registered_at: float = field(default_factory=time.time)
    stats: dict[str, Any] = field(default_factory=dict)

    def serves(self, model: str, version: int | None = None) -> bool:
        info = self.models.get(model)
        if info is None or not info.get("ready", True):
            return False
        return version is None or info.get("version") == version

    def has_credit(self) -> bool:
        return self.state == "ready" and len(self.in_flight) < self.credit

    @property
    def display_state(self) -> str:
        if self.state == "draining":
            return "draining"
        return "busy" if len(self.in_flight) >= self.credit else "ready"


@dataclass
class PendingRequest:
    rid: str
    client: bytes | None  # None: a shadow copy, answered to nobody
    service: bytes
    model: str
    version: int | None
    header: dict
    frames: list  # tensor frames, forwarded as-is
    deadline: float
    received: float
    attempts: int = 0
    worker: bytes | None = None


@dataclass
class ModelCounters:
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    retries: int = 0

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class ModelQueues:
    """A FIFO per model with O(1) removal, bounded by max_queue."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._queues: dict[str, OrderedDict[str, PendingRequest]] = {}

    def full(self, model: str) -> bool:
        return len(self._queues.get(model, ())) >= self.max_queue

    def push(self, req: PendingRequest, front: bool = False) -> None:
        q = self._queues.setdefault(req.model, OrderedDict())
        q[req.rid] = req
        if front:
            q.move_to_end(req.rid, last=False)

    def remove(self, req: PendingRequest) -> None:
        self._queues.get(req.model, {}).pop(req.rid, None)

    def waiting(self, model: str) -> list[PendingRequest]:
        return list(self._queues.get(model, {}).values())

    def models(self) -> list[str]:
        return [m for m, q in self._queues.items() if q]

    def depth(self, model: str) -> int:
        return len(self._queues.get(model, ()))


class AnsweredCache:
    """Request ids already answered (and their last replies), so a retried id is answered once.

    Ids are kept up to max_ids; the reply frames of the most recent max_replies only.
    """

    def __init__(self, max_ids: int = 100_000, max_replies: int = 1024):
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._replies: OrderedDict[str, list] = OrderedDict()
        self.max_ids, self.max_replies = max_ids, max_replies

    def add(self, rid: str, reply: list) -> None:
        self._ids[rid] = None
        self._replies[rid] = reply
        if len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)
        if len(self._replies) > self.max_replies:
            self._replies.popitem(last=False)

    def __contains__(self, rid: str) -> bool:
        return rid in self._ids

    def reply(self, rid: str) -> list | None:
        return self._replies.get(rid)
