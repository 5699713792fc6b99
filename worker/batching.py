"""Dynamic batching as a pure policy: which requests run together, and how long to wait.

Requests are grouped by (model, version, input names, dtypes and trailing shapes): only
requests that agree on everything but the first dimension may share a batch. A group is
ready when it holds the model's batch limit in rows or its oldest request has waited
max_queue_delay since it *arrived at the worker* (0, the worker's default: batch whatever is
queued when the compute thread turns to it). No clocks or threads here: callers pass ``now``.

Per model (``ModelBatching``, from ``Batcher.configure``): a batch limit of its own (1: never
batched) and, for a model whose ``input_spec`` declares variable-length inputs (``Ragged``),
ragged batching: requests of different lengths along dim 1 (the sequence axis) share a batch
when their lengths fall in the same bucket. ``concat_inputs`` pads each request to the bucket
length (with each input's pad value; a declared attention mask, built as ones when the
client sends none, pads with 0) and ``split_outputs`` cuts outputs that have the sequence axis
back to each request's own length. docs/models.md shows the declaration.

Without buckets every length shares a group, and a batch is padded to its own longest request;
so a batch is chosen by length (``choose_by_length``): the queued requests, sorted by length,
are cut into the runs that cost least to run, a batch costing ``overhead + rows x padded
length`` in tokens, and the run holding the oldest request is the batch. The overhead (what one
more model call costs, in padded tokens) is fitted from the batches the model ran (``CostFit``).
A long request then does not pad a batch of short ones when two calls cost less than the padding.
A model that packs its batch itself (``packed``: worker/packing.py, no padding is computed) is
not cut by length: its batch is the queue in arrival order, up to its limit.

Requests still in a model's preprocess stage are about to join its queue: a batch that is not
full waits for them (``coming``), at most ``stage_wait_s`` from its oldest request's arrival.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

RAGGED_KEYS = ("pad", "mask", "buckets", "max_len", "seq_outputs", "packed")


@dataclass(frozen=True)
class Ragged:
    """How a model's variable-length inputs pad, from its ``input_spec`` (see ``ragged_from_spec``)."""

    pads: Mapping[str, Any]  # input -> pad value, for every ragged input (the mask's is 0)
    mask: str | None = None  # the attention-mask input the worker builds when a request has none
    mask_dtype: str = "int64"
    buckets: tuple[int, ...] = ()  # padded lengths; () pads to the longest request of the batch
    max_len: int | None = None  # longest accepted length (default: the last bucket; None: any)
    seq_outputs: tuple[str, ...] | None = None  # outputs with the sequence axis; None: dim 1 == padded length
    packed: bool = False  # the model packs its batch (worker/packing.py): padding costs it nothing

    def bucket(self, length: int) -> int:
        """The length a request of `length` is padded to (0: no buckets, all lengths share a group)."""
        if not self.buckets:
            return 0
        return next((b for b in self.buckets if length <= b), length)

    @property
    def cut_by_length(self) -> bool:
        """Whether a batch is chosen by length (choose_by_length): only without buckets (every length
        shares a group) and when the model does not pack (padding costs it compute)."""
        return not self.buckets and not self.packed

    def padded_length(self, lengths: Sequence[int]) -> int:
        return max(max(lengths), self.bucket(max(lengths)))


def ragged_from_spec(spec: Mapping[str, Any] | None) -> Ragged | None:
    """The ragged declaration of an ``input_spec`` (None if it has none); ValueError if malformed.

    An entry is ``(shape, dtype)`` or ``(shape, dtype, options)``; options make the input
    variable along dim 1: ``pad`` (required: the value padding takes), ``mask`` (the name of
    the attention-mask input), ``buckets``, ``max_len``, ``seq_outputs``, ``packed`` (model-wide: they may
    appear on any ragged input, and must agree where they appear twice)."""
    if not spec:
        return None
    if not isinstance(spec, Mapping):
        raise ValueError(f"input_spec must be a dict of name -> (shape, dtype[, options]), got {type(spec).__name__}")
    pads: dict[str, Any] = {}
    wide: dict[str, Any] = {}
    for name, entry in spec.items():
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise ValueError(f"input_spec[{name!r}] must be (shape, dtype) or (shape, dtype, options), got {entry!r}")
        if len(entry) == 2:
            continue
        shape, opts = entry[0], entry[2]
        if not isinstance(opts, Mapping):
            raise ValueError(f"input_spec[{name!r}]: options must be a dict, got {opts!r}")
        unknown = sorted(set(opts) - set(RAGGED_KEYS))
        if unknown:
            raise ValueError(f"input_spec[{name!r}]: unknown options {unknown} (known: {list(RAGGED_KEYS)})")
        if "pad" not in opts or isinstance(opts["pad"], (str, bytes)) or not np.isscalar(opts["pad"]):
            raise ValueError(f"input_spec[{name!r}]: a variable-length input needs 'pad', a number (the padding value)")
        _check_seq_shape(name, shape)
        pads[name] = opts["pad"]
        for key in ("mask", "buckets", "max_len", "seq_outputs", "packed"):
            if key in opts:
                if key in wide and wide[key] != opts[key]:
                    raise ValueError(f"input_spec: {key!r} differs between variable-length inputs "
                                     f"({wide[key]!r} vs {opts[key]!r})")
                wide[key] = opts[key]
    if not pads:
        return None
    mask, mask_dtype = wide.get("mask"), "int64"
    if mask is not None:
        if not isinstance(mask, str) or mask not in spec:
            raise ValueError(f"input_spec: mask {mask!r} must name one of the inputs {sorted(spec)}")
        if mask in pads and pads[mask] != 0:
            raise ValueError(f"input_spec[{mask!r}]: the attention mask pads with 0, not {pads[mask]!r}")
        _check_seq_shape(mask, spec[mask][0])
        mask_dtype = spec[mask][1] or "int64"
        pads[mask] = 0
        if set(pads) == {mask}:
            raise ValueError(f"input_spec: the mask {mask!r} needs a variable-length input beside it (with 'pad')")
    buckets = wide.get("buckets", ())
    if not isinstance(buckets, (tuple, list)) or not all(_is_pos_int(b) for b in buckets) \
            or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"input_spec: buckets must be increasing positive integers, got {buckets!r}")
    max_len = wide.get("max_len", buckets[-1] if buckets else None)
    if max_len is not None and not _is_pos_int(max_len):
        raise ValueError(f"input_spec: max_len must be a positive integer, got {max_len!r}")
    if buckets and max_len > buckets[-1]:
        raise ValueError(f"input_spec: max_len {max_len} is beyond the last bucket {buckets[-1]}")
    seq_outputs = wide.get("seq_outputs")
    if seq_outputs is not None:
        if isinstance(seq_outputs, str) or not all(isinstance(o, str) for o in seq_outputs):
            raise ValueError(f"input_spec: seq_outputs must be a list of output names, got {seq_outputs!r}")
        seq_outputs = tuple(seq_outputs)
    packed = wide.get("packed", False)
    if not isinstance(packed, bool):
        raise ValueError(f"input_spec: packed must be true or false, got {packed!r}")
    return Ragged(pads, mask, mask_dtype, tuple(buckets), max_len, seq_outputs, packed)


def _check_seq_shape(name: str, shape: Any) -> None:
    if shape is not None and (len(shape) < 2 or shape[1] is not None):
        raise ValueError(f"input_spec[{name!r}]: a variable-length input's shape needs a free dim 1 "
                         f"(the sequence axis), e.g. (None, None), got {shape!r}")


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass(frozen=True)
class ModelBatching:
    """One model's batching: `max_batch` overrides the worker's limit (model option max_batch=N),
    `cap` bounds it (the factory's ``max_batch_size`` attribute; 1: the model never batches)."""

    max_batch: int | None = None
    cap: int | None = None
    ragged: Ragged | None = None


@dataclass(slots=True)  # slots: a third cheaper to build, and the socket thread builds one per request
class WorkItem:
    rid: str  # the master's dispatch key: what the worker answers by
    attempt: int
    model: str
    version: int | None
    inputs: dict[str, np.ndarray]
    rows: int
    arrival: float
    deadline: float
    keepalive: list = field(default_factory=list)  # the zmq frames the input views point into
    ragged: Ragged | None = None  # set by Batcher.add for a model with variable-length inputs
    length: int = 0  # the request's own length along the sequence axis (ragged models)
    cid: str | None = None  # the client's own request id, written beside the key in the reply
    link: int = 0  # which master it came from (the reply goes back there)
    timing: dict = field(default_factory=dict)  # ms per stage so far (preprocess_ms), for the reply's "timing"
    staged: bool = False  # its preprocess stage has run (worker/stages.py): it may join a batch
    stage_version: int | None = None  # the version whose stages preprocessed it: it runs on that version
    raw: dict[str, np.ndarray] | None = None  # with a preprocess stage: the request's own inputs
    restaged: int = 0  # times it was preprocessed again (its stages' version was swapped out)
    sig: tuple | None = None  # `signature(inputs)`, when the socket thread already has it (None: computed here)

    @property
    def client_id(self) -> str:
        return self.rid if self.cid is None else self.cid

    def group_key(self) -> Hashable:
        r = self.ragged
        if r is None:
            sig = self.sig if self.sig is not None else signature(self.inputs)
            return (self.model, self.version, self.stage_version, sig)
        sig = tuple(sorted((n, a.dtype.str, a.shape[2:] if n in r.pads else a.shape[1:])
                           for n, a in self.inputs.items()))
        return (self.model, self.version, self.stage_version, sig, r.bucket(self.length))


def signature(inputs: Mapping[str, np.ndarray]) -> tuple:
    """What requests of a model without variable-length inputs must agree on to share a batch:
    each input's name, dtype and shape past the first dimension. The socket thread computes it once
    per input signature it checked (numpy builds ``dtype.str`` anew on every read: this was about
    half of ``Batcher.add``) and passes it in ``WorkItem.sig``."""
    return tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))


def prepare_ragged(item: WorkItem, ragged: Ragged) -> None:
    """Note the request's length and build its attention mask (ones) when the client sent none."""
    item.ragged = ragged
    item.length = next(a.shape[1] for n, a in item.inputs.items() if n in ragged.pads)
    if ragged.mask is not None and ragged.mask not in item.inputs:
        item.inputs[ragged.mask] = np.ones((item.rows, item.length), dtype=ragged.mask_dtype)


class CostFit:
    """A model's batch time ~ a + b x tokens (rows x padded length), fitted by exponentially weighted
    least squares over the batches it ran; ``overhead_tokens`` (a / b) is what one more model call
    costs in padded tokens: large when calls dominate (a GPU), small when tokens do (a CPU)."""

    DECAY = 0.97  # each batch counts this much less than the next (about the last 30 batches matter)
    DEFAULT = 32.0  # before enough batches of different sizes were seen
    MAX = 1e6  # time does not grow with tokens: never split a batch by length
    MIN_BATCHES = 8

    def __init__(self) -> None:
        self.s0 = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.n = 0

    def observe(self, tokens: float, seconds: float) -> None:
        d = self.DECAY
        self.s0, self.sx, self.sy = d * self.s0 + 1.0, d * self.sx + tokens, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + tokens * tokens, d * self.sxy + tokens * seconds
        self.n += 1

    def overhead_tokens(self) -> float:
        if self.n < self.MIN_BATCHES:
            return self.DEFAULT
        spread = self.s0 * self.sxx - self.sx * self.sx
        if spread <= 1e-9 * self.s0 * self.sxx:
            return self.DEFAULT  # every batch the same size: nothing to fit
        b = (self.s0 * self.sxy - self.sx * self.sy) / spread
        if b <= 0:
            return self.MAX
        a = (self.sy - b * self.sx) / self.s0
        return min(max(a / b, 0.0), self.MAX)


def choose_by_length(items: Sequence[WorkItem], limit: int, overhead_tokens: float) -> list[WorkItem]:
    """The requests of the next batch, padded to its own longest. `items` (arrival order, the first
    the oldest) are sorted by length and cut into runs of at most `limit` rows so that the cost of
    running them all, a call (`overhead_tokens`) plus rows x longest per run, is least (the best cut
    of a sorted list is into runs: a shorter request never pads more in a batch of longer ones);
    the batch is the run that holds the oldest, so nobody waits for ever."""
    oldest = items[0]
    order = sorted(items, key=lambda i: i.length)  # stable: equal lengths keep their arrival order
    prefix = [0]
    for i in order:
        prefix.append(prefix[-1] + i.rows)
    n, inf = len(order), float("inf")
    best, cut = [0.0] + [inf] * n, [0] * (n + 1)  # best[j]: least cost of order[:j]; its last run is order[cut[j]:j]
    for j in range(1, n + 1):
        longest, i = order[j - 1].length, j - 1
        while i >= 0 and prefix[j] - prefix[i] <= limit:
            cost = best[i] + overhead_tokens + (prefix[j] - prefix[i]) * longest
            if cost <= best[j]:  # on a tie the longer run: fewer calls
                best[j], cut[j] = cost, i
            i -= 1
        if best[j] == inf:  # one request holds more rows than the limit: it runs alone
            best[j], cut[j] = best[j - 1] + overhead_tokens + order[j - 1].rows * longest, j - 1
    j = n
    while j > 0:
        run = order[cut[j]:j]
        if any(i is oldest for i in run):
            return run
        j = cut[j]
    return [oldest]  # not reached: some run holds every item


class Batcher:
    stage_wait_s = 0.002  # longest wait, from a group's oldest arrival, for requests still in its preprocess stage

    def __init__(self, max_batch_size: int = 1, max_queue_delay_s: float = 0.0,
                 models: Mapping[str, ModelBatching] | None = None, idle_gap_s: float | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        # A group that has not grown for idle_gap_s runs at once, whatever max_queue_delay_s allows:
        # under load requests keep coming and batches fill; at low load the wait is only the gap.
        self.idle_gap_s = max_queue_delay_s if idle_gap_s is None else min(idle_gap_s, max_queue_delay_s)
        self.models: dict[str, ModelBatching] = dict(models or {})
        self.groups: dict[Hashable, deque[WorkItem]] = {}
        self.rows: dict[Hashable, int] = {}
        # per group, a deadline no later than its soonest (exact after add and take_expired; after a batch
        # leaves it may be earlier than any left, which only costs one scan): take_expired skips a group
        # whose soonest deadline is still ahead, instead of rebuilding every queue on every turn
        self.soonest: dict[Hashable, float] = {}
        self.costs: dict[str, CostFit] = {}  # per ragged model without buckets: what a call costs in tokens

    def configure(self, models: Mapping[str, ModelBatching]) -> None:
        """Per-model limits and ragged declarations (models not named batch by the worker's limit)."""
        self.models.update(models)

    def limit(self, model: str) -> int:
        """Rows per batch for `model`."""
        m = self.models.get(model)
        if m is None:
            return self.max_batch_size
        base = m.max_batch or self.max_batch_size
        return min(base, m.cap) if m.cap else base

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def waiting(self, model: str) -> bool:
        """Whether any request for `model` is queued here."""
        return any(k[0] == model for k in self.groups)

    def add(self, item: WorkItem) -> None:
        m = self.models.get(item.model)
        if m is not None and m.ragged is not None:
            prepare_ragged(item, m.ragged)
        key = item.group_key()
        self.groups.setdefault(key, deque()).append(item)
        self.rows[key] = self.rows.get(key, 0) + item.rows
        soonest = self.soonest.get(key)
        if soonest is None or item.deadline < soonest:
            self.soonest[key] = item.deadline

    def add_all(self, items: Sequence[WorkItem]) -> None:
        """``add`` of each item in order, the group looked up once for a run of items that share the
        model and the checked signature (one REQUEST's requests, mostly): the same queues, rows and
        soonest deadlines as adding them one by one."""
        groups, rows, soonest, models = self.groups, self.rows, self.soonest, self.models
        last_model, last_sig, group, key = None, None, None, None
        for item in items:
            sig = item.sig
            if sig is None or item.model != last_model or sig is not last_sig or item.stage_version is not None:
                m = models.get(item.model)
                if sig is None or (m is not None and m.ragged is not None) or item.stage_version is not None:
                    self.add(item)  # ragged, staged or not yet signed: the general way
                    last_model = None
                    continue
                last_model, last_sig = item.model, sig
                key = (item.model, item.version, None, sig)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = deque()
            elif item.version != key[1]:
                key = (item.model, item.version, None, sig)
                group = groups.get(key)
                if group is None:
                    group = groups[key] = deque()
            group.append(item)
            rows[key] = rows.get(key, 0) + item.rows
            first = soonest.get(key)
            if first is None or item.deadline < first:
                soonest[key] = item.deadline

    def take_model(self, model: str) -> list[WorkItem]:
        """Remove and return every request queued for `model` (it cannot be loaded: each is answered)."""
        gone = []
        for key in [k for k in self.groups if k[0] == model]:
            gone.extend(self.groups.pop(key))
            self.rows.pop(key, None)
            self.soonest.pop(key, None)
        return gone

    def take_expired(self, now: float) -> list[WorkItem]:
        """Remove and return requests whose deadline has passed (they get TIMEOUT, no compute)."""
        gone = []
        soonest = self.soonest
        for key, group in list(self.groups.items()):
            if soonest.get(key, -1.0) > now:
                continue  # nobody in this group is due yet
            keep = deque(i for i in group if i.deadline > now)
            if len(keep) != len(group):
                gone.extend(i for i in group if i.deadline <= now)
                self._set(key, keep)
            if keep:
                soonest[key] = min(i.deadline for i in keep)
        return gone

    @staticmethod
    def wants_cost(batch: Sequence[WorkItem]) -> bool:
        """Whether ``observe`` uses what this batch cost (ragged models without buckets only)."""
        r = batch[0].ragged
        return r is not None and r.cut_by_length

    def observe(self, batch: Sequence[WorkItem], seconds: float) -> None:
        """A batch ran in `seconds`: fit what a call costs (ragged models without buckets only)."""
        r = batch[0].ragged
        if r is None or not r.cut_by_length:
            return
        tokens = sum(i.rows for i in batch) * r.padded_length([i.length for i in batch])
        self.costs.setdefault(batch[0].model, CostFit()).observe(tokens, seconds)

    def next_batch(self, now: float, runnable=None, coming=None) -> tuple[list[WorkItem], float | None]:
        """Return (batch, None) if a batch is ready, else ([], seconds to wait or None if idle).

        `runnable(model)` says whether a model can run now: groups of a model still loading wait
        (their deadlines still apply through take_expired). `coming(model)` counts its requests in
        the preprocess stage: a group that is not full waits for them, at most stage_wait_s."""
        keys = [k for k in self.groups if runnable is None or runnable(k[0])]
        if not keys:
            return [], None
        full = [k for k in keys if self.rows[k] >= self.limit(k[0])]
        oldest = min(keys, key=lambda k: self.groups[k][0].arrival)
        if full:
            key = min(full, key=lambda k: self.groups[k][0].arrival)
        else:
            group = self.groups[oldest]
            wait = min(group[0].arrival + self.max_queue_delay_s, group[-1].arrival + self.idle_gap_s) - now
            if wait <= 0 and coming is not None and coming(oldest[0]) > 0:
                wait = group[0].arrival + self.stage_wait_s - now
            if wait > 0:
                return [], wait
            key = oldest
        return self._pop(key), None

    def _pop(self, key: Hashable) -> list[WorkItem]:
        group, limit = self.groups[key], self.limit(key[0])
        r = group[0].ragged
        if r is not None and r.cut_by_length and len(group) > 1:
            fit = self.costs.get(key[0])
            batch = choose_by_length(group, limit, fit.overhead_tokens() if fit else CostFit.DEFAULT)
            taken = {id(i) for i in batch}
            self._set(key, deque(i for i in group if id(i) not in taken))
            return batch
        batch = [group.popleft()]
        rows = batch[0].rows
        while group and rows + group[0].rows <= limit:
            item = group.popleft()
            batch.append(item)
            rows += item.rows
        self._set(key, group, self.rows[key] - rows)  # what is left, without a walk over the queue
        return batch

    def _set(self, key: Hashable, group: deque, rows: int | None = None) -> None:
        """`group` is now the queue of `key`; `rows` its rows when the caller knows them (else summed)."""
        if group:
            self.groups[key] = group
            self.rows[key] = sum(i.rows for i in group) if rows is None else rows
        else:
            self.groups.pop(key, None)
            self.rows.pop(key, None)
            self.soonest.pop(key, None)


def concat_inputs(items: list[WorkItem]) -> dict[str, np.ndarray]:
    """Concatenate along the first dimension (one copy; the result is writable). Variable-length
    inputs of a ragged model are padded to the batch's padded length (its bucket) first."""
    names = items[0].inputs.keys()
    ragged = items[0].ragged
    if ragged is None:
        return {n: np.concatenate([i.inputs[n] for i in items], axis=0) for n in names}
    padded = ragged.padded_length([i.length for i in items])
    out = {}
    for n in names:
        if n not in ragged.pads:
            out[n] = np.concatenate([i.inputs[n] for i in items], axis=0)
            continue
        first = items[0].inputs[n]
        arr = np.full((sum(i.rows for i in items), padded, *first.shape[2:]), ragged.pads[n], dtype=first.dtype)
        row = 0
        for i in items:
            a = i.inputs[n]
            arr[row:row + i.rows, :a.shape[1]] = a
            row += i.rows
        out[n] = arr
    return out


def split_outputs(outputs: dict[str, Any], items: list[WorkItem]) -> list[dict[str, np.ndarray]]:
    """Split batched outputs back to their requests by row counts; for a ragged model, outputs
    with the sequence axis (dim 1) are cut back to each request's own length."""
    ragged = items[0].ragged
    if len(items) == 1 and ragged is None:
        return [outputs]
    total = sum(i.rows for i in items)
    if len(items) > 1:
        for name, arr in outputs.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                raise ValueError(f"output {name!r} has shape {list(arr.shape)}; a batched model must return "
                                 f"{total} rows along dim 0")
    cuts, row = [], 0  # (start, end) per request: slices are views, as np.split's are, at a fraction of its cost
    for i in items:
        cuts.append((row, row + i.rows))
        row += i.rows
    parts = {n: [a[lo:hi] for lo, hi in cuts] if len(items) > 1 else [a] for n, a in outputs.items()}
    if ragged is not None:
        padded = ragged.padded_length([i.length for i in items])
        for name, arr in outputs.items():
            if ragged.seq_outputs is None:
                cut = arr.ndim >= 2 and arr.shape[1] == padded
            elif name in ragged.seq_outputs:
                if arr.ndim < 2 or arr.shape[1] != padded:
                    raise ValueError(f"output {name!r} (declared in seq_outputs) has shape {list(arr.shape)}; "
                                     f"expected the padded length {padded} on dim 1")
                cut = True
            else:
                cut = False
            if cut:
                parts[name] = [p[:, :i.length] for p, i in zip(parts[name], items, strict=False)]
    return [{n: parts[n][k] for n in outputs} for k in range(len(items))]
