"""What the gateway knows of the cluster: the master's admin status, polled, and tensor signatures.

Health and model metadata come from the admin status (``ringserve-admin status``), read in a
worker thread once per interval so the event loop never waits on it; a status older than
three intervals counts as "master unreachable" (not ready).

Workers announce each model's version, versions and readiness but not its ``input_spec``
(the master keeps only the fields protocol/envelope.py's ``parse_models`` checks), so the
inputs and outputs listed in model metadata are learned from the requests that succeeded:
name, datatype and shape, the first dimension (the batch) always -1 and any dimension seen to
vary -1 too. Bounded: only models the master lists, at most MAX_TENSORS tensors a side.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from ringserve.client.admin import AdminClient
from ringserve.gateway.tensors import oip_datatype
from ringserve.protocol.codec import MAX_TENSORS

log = structlog.get_logger("ringserve.gateway")


@dataclass
class ModelView:
    versions: set[int] = field(default_factory=set)  # every version some worker holds
    ready_versions: set[int] = field(default_factory=set)  # ... on a worker where the model is ready
    inputs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # learned: name -> (datatype, shape)
    outputs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    last: dict[tuple[bool, str], tuple] = field(default_factory=dict)  # (output?, name) -> (dtype, shape[1:]) last seen
    learned: tuple | None = None  # the key of the last request learned from (see ModelBook.learn)

    @property
    def ready(self) -> bool:
        return bool(self.ready_versions)


def _learn(book: dict[str, tuple[str, list[int]]], tensors: dict[str, np.ndarray], last: dict,
           side: bool) -> None:
    for name, arr in tensors.items():
        sig = (arr.dtype, arr.shape[1:] if arr.ndim else None)
        if last.get((side, name)) == sig:
            continue  # as the previous request: nothing new to learn (the common case, and cheap)
        if len(last) < 2 * MAX_TENSORS:
            last[(side, name)] = sig
        datatype, shape = oip_datatype(arr), [-1, *arr.shape[1:]] if arr.ndim else []
        seen = book.get(name)
        if seen is None:
            if len(book) < MAX_TENSORS:
                book[name] = (datatype, shape)
        elif seen[1] != shape or seen[0] != datatype:
            old = seen[1]
            merged = [a if a == b else -1 for a, b in zip(old, shape, strict=True)] if len(old) == len(shape) else shape
            book[name] = (datatype, merged)


def declared_inputs(status: dict, model: str) -> dict[str, tuple[str, list[int]]]:
    """The inputs a worker announces for `model` (its module's input_spec), as OIP datatype and shape."""
    from ringserve.gateway.tensors import TO_NUMPY, oip_datatype

    for w in status.get("workers") or []:
        info = (w.get("models") or {}).get(model) if isinstance(w, dict) else None
        inputs = info.get("inputs") if isinstance(info, dict) else None
        if not isinstance(inputs, list):
            continue
        out = {}
        for name, dtype, dims in inputs[:MAX_TENSORS]:
            try:
                datatype = "BYTES" if dtype == "bytes" else oip_datatype(np.empty(0, np.dtype(dtype)))
            except TypeError:
                continue
            if datatype in TO_NUMPY or datatype == "BYTES":
                out[name] = (datatype, [-1] if dims is None else list(dims))
        return out
    return {}


def status_models(status: dict) -> tuple[dict[str, tuple[set[int], set[int]]], int]:
    """{model: (versions held, versions held where ready)} and the number of ready workers."""
    out: dict[str, tuple[set[int], set[int]]] = {}
    ready_workers = 0
    for w in status.get("workers") or []:
        if not isinstance(w, dict) or w.get("state") == "draining":
            continue
        any_ready = False
        for name, info in (w.get("models") or {}).items():
            if not isinstance(info, dict):
                continue
            held = {v for v in (info.get("versions") or []) if isinstance(v, int)}
            if isinstance(info.get("version"), int):
                held.add(info["version"])
            versions, ready = out.setdefault(name, (set(), set()))
            versions |= held
            if info.get("ready", True):
                ready |= held
                any_ready = True
        ready_workers += any_ready
    return out, ready_workers


class ModelBook:
    """The polled status and the learned signatures; read by the HTTP handlers, never blocking."""

    def __init__(self, admin: AdminClient | None, interval: float = 1.0):
        self.admin, self.interval = admin, interval
        self.models: dict[str, ModelView] = {}
        self.ready_workers = 0
        self.last_ok = 0.0
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None

    @property
    def reachable(self) -> bool:
        return time.monotonic() - self.last_ok <= 3 * self.interval

    @property
    def ready(self) -> bool:
        return self.reachable and self.ready_workers > 0

    def apply(self, status: dict) -> None:
        seen, self.ready_workers = status_models(status)
        for name in list(self.models):
            if name not in seen:
                del self.models[name]  # nobody serves it any more
        for name, (versions, ready) in seen.items():
            view = self.models.setdefault(name, ModelView())
            view.versions, view.ready_versions = versions, ready
            declared = declared_inputs(status, name)
            if declared:  # the module's input_spec, as its workers announce it: better than what traffic shows
                view.inputs = declared
        self.last_ok = time.monotonic()
        self.last_error = None

    def version_label(self, model: str, version: str | int | None) -> str:
        """A metrics label for a requested version: bounded to versions the master lists."""
        if version is None or version == "":
            return ""
        view = self.models.get(model)
        known = view is not None and str(version).isdigit() and int(version) in view.versions
        return str(int(version)) if known else "_unknown"

    def knows(self, model: str, key: tuple[object, object]) -> bool:
        """Whether `learn` with this key would have nothing new to teach (the same objects as the
        previous request's): a caller can then skip making the arrays it would pass."""
        view = self.models.get(model)
        if view is None:
            return True
        last = view.learned
        return last is not None and last[0] is key[0] and last[1] is key[1]

    def learn(self, model: str, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
              key: tuple[object, object] | None = None) -> None:
        """Learn the signatures of a request that succeeded. `key`: objects that decide them (the
        gateway passes its cached request plan and response header): a request with the same
        objects as the previous one (compared by identity) has nothing new to teach."""
        view = self.models.get(model)
        if view is None:
            return
        last = view.learned
        if key is not None and last is not None and last[0] is key[0] and last[1] is key[1]:
            return
        view.learned = key
        _learn(view.inputs, inputs, view.last, False)
        _learn(view.outputs, outputs, view.last, True)

    async def refresh(self) -> None:
        if self.admin is None:
            return
        try:
            status = await asyncio.to_thread(self.admin.status)
        except Exception as exc:  # a timeout, a refused key, a bad answer: not ready until the next one works
            if self.last_error != str(exc):
                log.warning("master_status_failed", error=str(exc))
            self.last_error = str(exc)
            return
        if isinstance(status, dict):
            self.apply(status)

    async def run(self) -> None:
        """Poll for as long as the gateway serves (cancelled at shutdown)."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
