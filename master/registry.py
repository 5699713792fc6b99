"""The master's records: workers, requests, per-model queues, de-duplication.

Plain data, no sockets: the broker mutates these in its one loop.
"""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ringserve.protocol.sockets import frames_nbytes


def held_versions(info: dict) -> set[int]:
    """{"version": 4, "versions": [3, 4]} -> {3, 4}: the current version and any kept beside it."""
    return {v for v in (info.get("version"), *info.get("versions", ())) if v is not None}


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
    user: str | None = None  # with keys: the CURVE identity it registered with (revoking it evicts the worker)
    framing: int = 1  # the worker-hop framing it reads (protocol.envelope.FRAMING; its READY says)
    # versions() per model, for the models map it was computed from (checked on every reply; the map
    # is replaced, never changed in place, when the worker's announcement changes)
    _held: tuple = field(default=(None, {}), repr=False, compare=False)

    def serves(self, model: str, version: int | None = None) -> bool:
        info = self.models.get(model)
        if info is None or not info.get("ready", True):
            return False
        return version is None or version in held_versions(info)

    def can_load(self, model: str) -> bool:
        """An on-demand model this worker may load on a request (it is not loaded now)."""
        info = self.models.get(model)
        return info is not None and bool(info.get("on_demand")) and not info.get("ready", True)

    def has_room(self) -> bool:
        """Room for one more on-demand model without an eviction (as of its last heartbeat)."""
        loaded, cap = self.stats.get("models_loaded"), self.stats.get("max_models")
        return not (isinstance(loaded, int) and isinstance(cap, int)) or loaded < cap

    def versions(self, model: str) -> frozenset[int]:
        """Every version of `model` this worker holds (a request may pin any of them)."""
        models, cache = self._held
        if models is not self.models:
            models, cache = self._held = (self.models, {})
        held = cache.get(model)
        if held is None:
            info = models.get(model)
            if info is None:
                return frozenset()  # a name it does not serve: not kept, so the cache is bounded by its models
            held = cache[model] = frozenset(held_versions(info))
        return held

    def has_credit(self) -> bool:
        return self.state == "ready" and len(self.in_flight) < self.credit

    @property
    def display_state(self) -> str:
        if self.state == "draining":
            return "draining"
        return "busy" if len(self.in_flight) >= self.credit else "ready"


@dataclass(slots=True)  # one per request: slots make it smaller and quicker to build and read
class PendingRequest:
    key: str  # the master's own name for it (unique per master process): books and workers use this
    rid: str  # the client's id, unique only within its scope; answers carry it
    client: bytes | None  # the routing id that asked last: answers go there (a retry may come from a new
    #                       socket); None for a shadow copy, answered to nobody
    service: bytes
    model: str
    version: int | None
    header: Any  # the client's header frame, forwarded to the worker as received (never re-packed)
    frames: list  # out-of-line tensor frames, forwarded as-is
    deadline: float
    received: float
    attempts: int = 0
    worker: bytes | None = None
    seq: int = 0  # queue order, set by ModelQueues.push (negative: re-queued at the front)
    scope: str = ""  # whose id `rid` is: the client's CURVE key, else its address (see client_scope)
    pinned: bool = False  # the client pinned `version`; otherwise a route chose it, and re-chooses on re-queue
    tags: dict | None = None  # the client's routing tags (a sticky route re-chooses with them)
    counted: bool = True  # counted in its model's counters (False: counted as an unknown name on arrival)
    digest: bytes | None = None  # its inputs' digest, when its model is cacheable (master/cache.py)


@dataclass
class ModelCounters:
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    retries: int = 0

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class ModelQueues:
    """Per model, one FIFO per version pin (None: any version), with O(1) push and removal.

    Dispatch looks only at the head of each pin's FIFO, so its cost does not grow with the
    queue. Requests re-queued at the front (their worker was lost) go before every other one.
    Bounded: `max_queue` requests per model, `max_pins` distinct pins per model.
    """

    def __init__(self, max_queue: int, max_pins: int = 64):
        self.max_queue, self.max_pins = max_queue, max_pins
        self._queues: dict[str, dict[int | None, OrderedDict[str, PendingRequest]]] = {}  # model -> pin -> key ->
        self._depth: dict[str, int] = {}
        self._seq = itertools.count()
        self._front_seq = itertools.count(-1, -1)
        self.heads_examined = 0  # cost counter, for tests: heads looked at by dispatch

    def full(self, model: str, version: int | None = None) -> bool:
        """No room for one more request of `model` (pinned to `version`)."""
        if self._depth.get(model, 0) >= self.max_queue:
            return True
        pins = self._queues.get(model, {})
        return version not in pins and len(pins) >= self.max_pins

    def push(self, req: PendingRequest, front: bool = False) -> None:
        model, key = req.model, req.key
        pins = self._queues.get(model)
        if pins is None:
            pins = self._queues[model] = {}
        q = pins.get(req.version)
        if q is None:  # not setdefault: it would build an OrderedDict on every push
            q = pins[req.version] = OrderedDict()
        if key not in q:
            self._depth[model] = self._depth.get(model, 0) + 1
        if front:
            req.seq = next(self._front_seq)
            q[key] = req
            q.move_to_end(key, last=False)
        else:
            req.seq = next(self._seq)
            q[key] = req

    def push_new(self, req: PendingRequest, pin: int | None) -> bool:
        """`push(req)` when `full(req.model, pin)` says there is room; False (nothing queued) when
        full. The room is for the client's `pin` (None: unpinned), the FIFO is `req.version`'s."""
        if self.full(req.model, pin):
            return False
        self.push(req)
        return True

    def remove(self, req: PendingRequest) -> None:
        pins = self._queues.get(req.model)
        q = pins.get(req.version) if pins else None
        if q is None or q.pop(req.key, None) is None:
            return
        self._depth[req.model] -= 1
        if not q:  # empty FIFOs and models are dropped, so the books do not grow with names asked
            del pins[req.version]
            if not pins:
                del self._queues[req.model]
                del self._depth[req.model]

    def pop_front(self, model: str, pin: int | None, n: int) -> list[PendingRequest]:
        """Up to `n` of the oldest waiting requests of `model` pinned to `pin`, in order, taken off the
        queue (dispatch hands a run of them to one worker in one go)."""
        pins = self._queues.get(model)
        q = pins.get(pin) if pins else None
        if not q or n <= 0:
            return []
        popitem = q.popitem
        out = [popitem(last=False)[1] for _ in range(min(n, len(q)))]
        self._depth[model] -= len(out)
        if not q:
            del pins[pin]
            if not pins:
                del self._queues[model]
                del self._depth[model]
        return out

    def heads(self, model: str) -> list[tuple[int | None, PendingRequest]]:
        """The oldest waiting request of each version pin of `model`."""
        out = [(pin, next(iter(q.values()))) for pin, q in self._queues.get(model, {}).items()]
        self.heads_examined += len(out)
        return out

    def waiting(self, model: str) -> list[PendingRequest]:
        """Every waiting request of `model`, oldest first (for status and tests, not dispatch)."""
        return sorted((r for q in self._queues.get(model, {}).values() for r in q.values()), key=lambda r: r.seq)

    def models(self) -> list[str]:
        return list(self._queues)

    def depth(self, model: str) -> int:
        return self._depth.get(model, 0)


reply_size = frames_nbytes  # bytes held by a reply's frames (protocol/sockets.py)


class AnsweredCache:
    """Request ids already answered (and their last replies), so a retried id is answered once.

    Keyed by (scope, id): a client's id means something only within its own scope (its key), so
    one tenant can never be handed another's answer. Each entry remembers the model it answered,
    the routing id the answer last went to and, while the byte budget allows, the reply itself.
    Ids are kept up to `max_ids`; reply frames (the body after the service frame, so they can be
    sent to whichever socket asks) only while their total stays within `max_bytes`, newest first.
    A reply bigger than the whole budget is not kept at all.

    The master's hot paths hand `add` a reply as a tuple (service, header, *frames): the entries are
    then tuples of bytes, msgspec.Raw or str that the cyclic GC stops tracking after one collection,
    so the up to `max_ids` entries are not walked again by every full collection (while the cache
    grows, those walks cost more than the adds: issue 22, seventh round, second pass). `reply`
    gives back what was stored (a list or a tuple: both are sendable frame sequences).
    """

    def __init__(self, max_ids: int = 100_000, max_bytes: int = 64 << 20):
        # (scope, id) -> (model, delivered to): tuples of str/bytes/None, which the cyclic GC stops tracking,
        # so the up to `max_ids` entries are not walked by every full collection
        self._ids: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self._replies: OrderedDict[tuple[str, str], tuple[list, int]] = OrderedDict()
        self.max_ids, self.max_bytes = max_ids, max_bytes
        self.bytes = 0

    def add(self, cid: tuple[str, str], model: str, body: list, delivered_to: bytes | None = None,
            nbytes: int | None = None) -> None:
        """Remember `cid` as answered with `body`; `nbytes` is reply_size(body) when the caller knows it."""
        ids, replies = self._ids, self._replies
        n = len(ids)
        ids[cid] = (model, delivered_to)  # one lookup of the (large) map, not a membership test and a store
        if len(ids) == n:  # answered again (rare): it becomes the newest, its old reply is dropped
            ids.move_to_end(cid)
            self._drop_reply(cid)
        size = (reply_size(body) if nbytes is None else nbytes) + len(cid[0]) + len(cid[1]) + 64
        if size <= self.max_bytes:
            replies[cid] = (body, size)
            self.bytes += size
        while self.bytes > self.max_bytes and replies:
            self.bytes -= replies.popitem(last=False)[1][1]  # the oldest reply held
        while len(ids) > self.max_ids:
            old, _ = ids.popitem(last=False)
            self._drop_reply(old)

    def _drop_reply(self, cid: tuple[str, str]) -> None:
        held = self._replies.pop(cid, None)
        if held is not None:
            self.bytes -= held[1]

    def __contains__(self, cid: tuple[str, str]) -> bool:
        return cid in self._ids

    @property
    def ids(self) -> dict:
        """The ids held (read-only use: membership), for a caller that asks once per request."""
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def model(self, cid: tuple[str, str]) -> str | None:
        entry = self._ids.get(cid)
        return entry[0] if entry is not None else None

    def delivered_to(self, cid: tuple[str, str]) -> bytes | None:
        """The routing id the answer was last handed to ZeroMQ for (None: not sent, or unknown)."""
        entry = self._ids.get(cid)
        return entry[1] if entry is not None else None

    def resent_to(self, cid: tuple[str, str], ident: bytes) -> None:
        """The answer went again, to `ident`: a further resend on that socket gets only an ACK."""
        entry = self._ids.get(cid)
        if entry is not None:  # a store to a key held keeps its place in the order
            self._ids[cid] = (entry[0], ident)

    def reply(self, cid: tuple[str, str]) -> list | None:
        held = self._replies.get(cid)
        return held[0] if held is not None else None

    @property
    def replies_held(self) -> int:
        return len(self._replies)
