"""Dynamic batching as a pure policy: which requests run together, and how long to wait.

Requests are grouped by (model, version, input names, dtypes and trailing shapes): only
requests that agree on everything but the first dimension may share a batch. A group is
ready when it holds max_batch_size rows or its oldest request has waited max_queue_delay
since it *arrived at the worker*. No clocks or threads here: callers pass ``now``.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable

import numpy as np


@dataclass
class WorkItem:
    rid: str
    attempt: int
    model: str
    version: int | None
    inputs: dict[str, np.ndarray]
    rows: int
    arrival: float
    deadline: float
    keepalive: list = field(default_factory=list)  # the zmq frames the input views point into

    def group_key(self) -> Hashable:
        sig = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in self.inputs.items()))
        return (self.model, self.version, sig)


class Batcher:
    def __init__(self, max_batch_size: int = 1, max_queue_delay_s: float = 0.0):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.groups: dict[Hashable, deque[WorkItem]] = {}
        self.rows: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def waiting(self, model: str) -> bool:
        """Whether any request for `model` is queued here."""
        return any(k[0] == model for k in self.groups)

    def add(self, item: WorkItem) -> None:
        key = item.group_key()
        self.groups.setdefault(key, deque()).append(item)
        self.rows[key] = self.rows.get(key, 0) + item.rows

    def take_expired(self, now: float) -> list[WorkItem]:
        """Remove and return requests whose deadline has passed (they get TIMEOUT, no compute)."""
        gone = []
        for key, group in list(self.groups.items()):
            keep = deque(i for i in group if i.deadline > now)
            if len(keep) != len(group):
                gone.extend(i for i in group if i.deadline <= now)
                self._set(key, keep)
        return gone

    def next_batch(self, now: float, runnable=None) -> tuple[list[WorkItem], float | None]:
        """Return (batch, None) if a batch is ready, else ([], seconds to wait or None if idle).

        `runnable(model)` says whether a model can run now: groups of a model still loading wait
        (their deadlines still apply through take_expired)."""
        keys = [k for k in self.groups if runnable is None or runnable(k[0])]
        if not keys:
            return [], None
        full = [k for k in keys if self.rows[k] >= self.max_batch_size]
        oldest = min(keys, key=lambda k: self.groups[k][0].arrival)
        if full:
            key = min(full, key=lambda k: self.groups[k][0].arrival)
        else:
            wait = self.groups[oldest][0].arrival + self.max_queue_delay_s - now
            if wait > 0:
                return [], wait
            key = oldest
        return self._pop(key), None

    def _pop(self, key: Hashable) -> list[WorkItem]:
        group = self.groups[key]
        batch, rows = [group.popleft()], 0
        rows = batch[0].rows
        while group and rows + group[0].rows <= self.max_batch_size:
            item = group.popleft()
            batch.append(item)
            rows += item.rows
        self._set(key, group)
        return batch

    def _set(self, key: Hashable, group: deque) -> None:
        if group:
            self.groups[key] = group
            self.rows[key] = sum(i.rows for i in group)
        else:
            self.groups.pop(key, None)
            self.rows.pop(key, None)


def concat_inputs(items: list[WorkItem]) -> dict[str, np.ndarray]:
    """Concatenate along the first dimension (one copy; the result is writable)."""
    names = items[0].inputs.keys()
    return {n: np.concatenate([i.inputs[n] for i in items], axis=0) for n in names}


def split_outputs(outputs: dict[str, Any], items: list[WorkItem]) -> list[dict[str, np.ndarray]]:
    """Split batched outputs back to their requests by row counts."""
    if len(items) == 1:
        return [outputs]
    total = sum(i.rows for i in items)
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise ValueError(f"output {name!r} has shape {list(arr.shape)}; a batched model must return "
                             f"{total} rows along dim 0")
    bounds = np.cumsum([i.rows for i in items])[:-1]
    parts = {n: np.split(a, bounds) for n, a in outputs.items()}
    return [{n: parts[n][k] for n in outputs} for k in range(len(items))]
