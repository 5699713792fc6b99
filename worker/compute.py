"""The compute thread: forms batches, runs the model, hands replies to the socket thread.

It owns one inproc PUSH socket (made in this thread) and never touches the master socket.
Weight swaps are applied here, between batches, so no batch ever sees two versions; the
weight-sync thread hands over a complete module (built, converted and on the device), so a
swap here is one reference assignment and never stalls serving. A batch pinned to an earlier
version the model still holds (keep=N) runs on that version's module.

Every batch gets its answers whatever fails (model, output encoding, splitting): a batch that
fails as a whole is re-run one request at a time, so only the guilty request fails, and an
error the input caused (an out-of-range id, a shape the model cannot take) is answered
BAD_REQUEST with a clear line rather than INTERNAL. ``busy_since`` tells the socket thread how
long the current batch has run, so a stuck model makes the worker leave (see agent.py).
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Mapping

import structlog
import torch
import zmq

from ringserve.protocol.codec import encode_tensors
from ringserve.protocol.messages import ErrorCode, error_body
from ringserve.worker.batching import Batcher, WorkItem, concat_inputs, split_outputs
from ringserve.worker.handoff import (
    CHANGED, batch_outputs, joined_header, packed_timing, result_frames, shared_fields,
)
from ringserve.worker.loader import ServedModel, input_error
from ringserve.worker.metrics import WorkerMetrics
from ringserve.worker.stages import POST, PRE, Inbox, StagePool, Task

log = structlog.get_logger("ringserve.worker.compute")

IDLE_WAIT_S = 0.05
OWN_FIELDS = 5  # what each answer of a packed batch adds to the shared fields: id, key, attempt, outputs, timing
NO_FRAMES = ()  # an answer with every output inline: no frames of its own (one tuple for all)
MAX_RESTAGED = 3  # times a request may be preprocessed again because its stages' version was swapped out


class BatchStats:
    """Per-batch figures shown in the admin status."""

    def __init__(self) -> None:
        self.batches = self.requests = self.rows = self.max_rows = 0
        self.queue_wait_s = self.compute_s = 0.0
        self.skipped_expired = 0

    def record(self, items: list[WorkItem], rows: int, waits: list[float], started: float, finished: float) -> None:
        self.batches += 1
        self.requests += len(items)
        self.rows += rows
        self.max_rows = max(self.max_rows, rows)
        self.queue_wait_s += sum(waits)
        self.compute_s += finished - started

    def snapshot(self) -> dict:
        b = max(self.batches, 1)
        return {"batches": self.batches, "requests": self.requests, "rows": self.rows,
                "mean_batch_size": round(self.rows / b, 3), "max_batch_size_seen": self.max_rows,
                "mean_queue_wait_ms": round(1000 * self.queue_wait_s / max(self.requests, 1), 3),
                "mean_compute_ms": round(1000 * self.compute_s / b, 3),
                "skipped_expired": self.skipped_expired}


class ComputeThread(threading.Thread):
    def __init__(self, ctx: zmq.Context, results_endpoint: str, models: Mapping[str, ServedModel],
                 batcher: Batcher, metrics: WorkerMetrics | None = None):
        super().__init__(name="ringserve-compute", daemon=True)
        self.ctx, self.results_endpoint, self.models, self.batcher = ctx, results_endpoint, models, batcher
        batcher.configure({name: m.batching for name, m in models.items()})  # per-model limits, ragged inputs
        # One list of WorkItems per REQUEST message; an empty list only ends an idle wait (wake).
        self.inbox: Inbox = Inbox()  # requests of a model with a preprocess stage go to the stage pool first
        self.swaps: queue.Queue[tuple[str, object, int]] = queue.Queue()  # (model, built module, version)
        self.stats = BatchStats()
        self.metrics = metrics or WorkerMetrics()
        self.stopping = threading.Event()
        self.push: zmq.Socket | None = None
        self.max_models = 0  # > 0: on-demand models, the least recently used beyond this are evicted
        self.request_load = lambda name: None  # set by the agent: ask the weight sync to load a model
        self.busy_since: float | None = None  # monotonic start of the batch now running, else None
        self.worker_name: str | None = None  # set by the agent: replies name their worker and the master's
        self.epochs: dict[int, str | None] = {}  # per master link: its epoch, so the master can pass them to the client byte for byte
        self.stage_threads = 2  # --stage-threads: the pool that runs pre/postprocess stages (worker/stages.py)
        self.stages: StagePool | None = None

    def start(self) -> None:
        """Start the stage pool first (when a model has stages), so no request reaches the inbox before it."""
        if self.stages is None and any(m.has_stages for m in self.models.values()):
            self.stages = StagePool(self.ctx, self.results_endpoint, self.stage_threads, self.metrics,
                                    lambda item: self.inbox.put_ready([item]))
            self.stages.start()
            self.inbox.route = self._route
        super().start()

    def _route(self, items: list[WorkItem]) -> list[WorkItem]:
        """Requests whose model has a preprocess stage go to the pool; the rest may be batched now."""
        now = []
        for item in items:
            model = self.models.get(item.model)
            if model is not None and model.preprocess is not None and not item.staged:
                self.stages.submit(Task(PRE, model, item))
            else:
                now.append(item)
        return now

    def run(self) -> None:
        # OpenMP's thread count is per OS thread: without this, the model runs here with the
        # default team (one thread per core) whatever --threads set in the main thread, and the
        # team's idle threads spin between batches (measured: a whole core at 1,100 req/s).
        torch.set_num_threads(torch.get_num_threads())
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(self.results_endpoint)
        try:
            while not self.stopping.is_set():  # nothing below raises out of one turn but a bug
                self._apply_swaps()
                self._take_inbox(block_s=None)
                now = time.monotonic()
                for item in self.batcher.take_expired(now):
                    self.stats.skipped_expired += 1
                    self._reply_error(item, ErrorCode.TIMEOUT, "deadline passed before compute started")
                self._fail_unloadable()
                batch, wait = self.batcher.next_batch(now, self._runnable, self._coming)
                if batch:
                    self._run_batch(batch)
                else:
                    self._take_inbox(block_s=IDLE_WAIT_S if wait is None else min(wait, IDLE_WAIT_S))
        finally:
            if self.stages is not None:
                self.stages.stop()
            self.push.close(linger=0)

    def wake(self) -> None:
        """Stop waiting for requests now (a swap is queued): any thread may call this."""
        self.inbox.put([])

    def _take_inbox(self, block_s: float | None) -> None:
        add_all = self.batcher.add_all
        try:
            if block_s is not None:
                add_all(self.inbox.get(timeout=max(block_s, 0.0)))
            while True:
                add_all(self.inbox.get_nowait())
        except queue.Empty:
            pass

    def _apply_swaps(self) -> None:
        if not self.swaps.qsize():  # the common turn: nothing queued, and no Empty raised to say so
            return  # (a swap queued after this look is seen next turn: the weight-sync thread wakes us)
        changed = False
        while True:
            try:
                name, module, version = self.swaps.get_nowait()
            except queue.Empty:
                break
            try:
                t0 = time.monotonic()
                cold = not self.models[name].ready
                self.models[name].install(module, version)
                if cold and self.models[name].on_demand:
                    self.metrics.on_load(name)
                changed = True
                self.metrics.on_swap(name, time.monotonic() - t0)
                log.info("weights_swapped", model=name, version=version)
                if self.max_models:
                    self._evict_beyond_max(keep=name)
            except Exception as exc:
                log.error("weights_swap_failed", model=name, version=version, error=str(exc))
        if changed:
            self.push.send_multipart([CHANGED])

    def _fail_unloadable(self) -> None:
        """Requests waiting for an on-demand model whose load was refused get their answer now, not
        at their deadline: the weight-sync thread will not fetch a refused version again."""
        for m in self.models.values():
            refused = m.refused
            if not m.on_demand or m.ready or m.loading or refused is None or not self.batcher.waiting(m.name):
                continue
            message = (f"model {m.name!r} could not be loaded on this worker: version {refused['version']} "
                       f"was refused ({refused['reason'][:300]})")
            for item in self.batcher.take_model(m.name):
                self._reply_error(item, ErrorCode.INTERNAL, message)

    def _runnable(self, name: str) -> bool:
        return self.models[name].ready

    def _coming(self, name: str) -> int:
        """Requests for `name` in its preprocess stage now: they join its queue within a moment."""
        return 0 if self.stages is None else self.stages.coming.get(name, 0)

    def _evict_beyond_max(self, keep: str) -> None:
        """Unload the least recently used on-demand models beyond max_models (never `keep`, the one
        just loaded; models with queued requests go last, and are asked to load again if evicted)."""
        loaded = [m for m in self.models.values() if m.on_demand and m.ready]
        excess = len(loaded) - self.max_models
        if excess <= 0:
            return
        victims = sorted((m for m in loaded if m.name != keep), key=lambda m: (self.batcher.waiting(m.name), m.last_used))
        for m in victims[:excess]:
            m.unload()
            self.metrics.on_evict(m.name)
            log.info("model_evicted", model=m.name, max_models=self.max_models)
            if self.batcher.waiting(m.name):
                self.request_load(m.name)

    def _run_batch(self, batch: list[WorkItem]) -> None:
        model = self.models[batch[0].model]
        pinned = batch[0].version
        if not model.holds(pinned):
            for item in batch:
                self._reply_error(item, ErrorCode.UNKNOWN_VERSION,
                                  f"worker now serves version(s) {model.versions()}, not {pinned}")
            return
        if batch[0].staged:  # tokenized by one version's stages: it runs on that version, or is tokenized again
            staged_by = batch[0].stage_version
            target = staged_by if pinned is None else pinned
            if target is None or staged_by != target or not model.holds(target):
                self._restage(model, batch)
                return
            pinned = target
        started = self.busy_since = time.monotonic()
        # What a call costs, for a batcher that cuts batches by length (Batcher.wants_cost): on a CPU
        # this thread's CPU time, which other processes on a shared machine do not inflate (with more
        # torch threads it counts this thread's share, as the wall time of the parallel part shrinks
        # too); on a GPU the wall time. Read only then: the thread's clock is a system call.
        costed = self.batcher.wants_cost(batch)
        cpu_started = time.thread_time() if costed and model.device.type == "cpu" else None
        owners = batch  # the item each reply answers (none for those gone on to a postprocess stage)
        try:
            replies = self._compute(model, batch, pinned)
            owners = [] if model.opts.postprocess is not None else batch
            if costed:
                took = time.thread_time() - cpu_started if cpu_started is not None else time.monotonic() - started
                self.batcher.observe(batch, took)
        except Exception as exc:
            if len(batch) == 1:
                replies = [self._failure(model, batch[0], exc)]
            else:  # re-run one by one, so only the request that causes the failure fails
                log.info("batch_failed_rerunning_singly", model=model.name, error=f"{type(exc).__name__}: {exc}",
                         request_ids=[i.client_id for i in batch])
                replies, owners = [], []
                for item in batch:
                    try:
                        one_reply = self._compute(model, [item], pinned)
                    except Exception as one:
                        one_reply = [self._failure(model, item, one)]
                    replies += one_reply
                    owners += [item] * len(one_reply)
        finally:
            finished = time.monotonic()
            self.busy_since = None
            rows, waits = sum(i.rows for i in batch), [started - i.arrival for i in batch]  # once, for both books
            self.stats.record(batch, rows, waits, started, finished)
            self.metrics.on_batch(model.name, rows, waits, finished - started)
        self._push(replies, owners)

    def _restage(self, model: ServedModel, batch: list[WorkItem]) -> None:
        """Requests preprocessed by stages of a version swapped out since go back to the stage pool,
        to be preprocessed by the version that will run them (a few times at most: then INTERNAL)."""
        for item in batch:
            if item.restaged >= MAX_RESTAGED:
                self._reply_error(item, ErrorCode.INTERNAL, f"model {model.name!r} changed version "
                                  f"{MAX_RESTAGED} times while this request waited; try again")
                continue
            item.restaged += 1
            item.staged, item.inputs, item.stage_version = False, item.raw, None
            self.stages.submit(Task(PRE, model, item))
        log.info("requests_restaged", model=model.name, count=len(batch), serving=model.version)

    def _push(self, replies: list[tuple[dict | bytes, list]], items: list[WorkItem]) -> None:
        """Hand a batch's replies (one per item, in order) to the socket thread, one message per
        master they go back to (it sends each as one REPLY)."""
        if not replies:
            return  # every request of the batch went on to its postprocess stage
        # Blocks only at the inproc pipe's high-water mark, which the socket thread keeps draining.
        links = {item.link for item in items}
        for link in sorted(links):
            mine = replies if len(links) == 1 else [r for r, i in zip(replies, items, strict=False) if i.link == link]
            self.push.send_multipart(result_frames(link, mine), copy=False)

    def _compute(self, model: ServedModel, batch: list[WorkItem], pinned: int | None) -> list[tuple[dict | bytes, list]]:
        """Run and encode a batch; raises if anything about it fails (no partial answers). What is the
        same for every answer of the batch is looked up once, outside the loop over its requests."""
        version = model.version if pinned is None else pinned
        started = time.monotonic()
        outputs = model.run(concat_inputs(batch), pinned)
        rows = sum(i.rows for i in batch)
        compute_ms = round(1000 * (time.monotonic() - started), 3)
        post_stages = model.stages_for(version) if model.has_stages and model.opts.postprocess is not None else None
        name, worker, epochs = batch[0].model, self.worker_name, self.epochs  # one model per batch
        if post_stages is None and len(batch) > 1 and batch[0].ragged is None:
            metas = batch_outputs(outputs, [i.rows for i in batch], packed=True)  # each request's, encoded
            if metas is not None:
                return self._packed_replies(model, batch, version, rows, started, compute_ms, metas)
        replies = []
        post = []  # handed to the stage pool only once the whole batch has split (a failure re-runs it)
        for item, out in zip(batch, split_outputs(outputs, batch), strict=True):
            queue_ms = round(1000 * (started - item.arrival), 3)
            timing = {**item.timing, "queue_ms": queue_ms, "compute_ms": compute_ms} if item.timing \
                else {"queue_ms": queue_ms, "compute_ms": compute_ms}
            header = {"id": item.client_id, "key": item.rid, "attempt": item.attempt, "ok": True, "model": name,
                      "version": version, "outputs": [], "batch_rows": rows, "timing": timing}
            epoch = epochs.get(item.link)
            if epoch is not None and worker is not None:
                header["worker"], header["epoch"] = worker, epoch
            if post_stages is not None:
                post.append(Task(POST, model, item, out, header, stages=post_stages))
                continue
            header["outputs"], frames = encode_tensors(out)
            replies.append((header, frames))
        if replies:
            self.metrics.on_answers(model.name, "ok", len(replies))
        for task in post:
            self.stages.submit(task)
        return replies

    def _packed_replies(self, model: ServedModel, batch: list[WorkItem], version: int | None, rows: int,
                        started: float, compute_ms: float, metas: list[list]) -> list[tuple[bytes, list]]:
        """The batch's answers with every output inline (``batch_outputs``, each request's list already
        encoded): the same fields as the general path's headers, each packed as it goes to the master,
        the fields all of them share packed once per master link (``joined_header``), the timing map
        once per arrival (the requests of one REQUEST arrived together)."""
        shared_base = {"ok": True, "model": batch[0].model, "version": version, "batch_rows": rows}
        shared: dict[int, tuple] = {}
        worker, epochs = self.worker_name, self.epochs
        replies = []
        append = replies.append
        link, fields = None, None
        arrival, timing = None, None  # the requests of one REQUEST arrived together: one timing map for them
        for item, meta in zip(batch, metas, strict=True):
            if item.link != link:  # a batch mostly comes from one master: look its fields up on a change only
                link = item.link
                fields = shared.get(link)
                if fields is None:
                    epoch = epochs.get(link)
                    fields = shared[link] = shared_fields(
                        {**shared_base, "worker": worker, "epoch": epoch} if epoch is not None and worker is not None
                        else shared_base, OWN_FIELDS)
            if item.timing:  # times of its own (a preprocess stage): a map of its own
                timing, arrival = {**item.timing, "queue_ms": round(1000 * (started - item.arrival), 3),
                                   "compute_ms": compute_ms}, None
            elif item.arrival != arrival or timing is None:
                arrival = item.arrival
                timing = packed_timing({"queue_ms": round(1000 * (started - arrival), 3), "compute_ms": compute_ms})
            append((joined_header({"id": item.client_id, "key": item.rid, "attempt": item.attempt, "outputs": meta,
                                   "timing": timing}, fields), NO_FRAMES))
        self.metrics.on_answers(model.name, "ok", len(replies))
        return replies

    def _failure(self, model: ServedModel, item: WorkItem, exc: Exception) -> tuple[dict, list]:
        """The error answer for one request: BAD_REQUEST when its input is the cause, else INTERNAL."""
        why = input_error(exc)
        raw = f"{type(exc).__name__}: {exc}"
        if why is not None:
            log.info("model_rejected_input", model=model.name, request_id=item.client_id, error=raw)
            code, message = ErrorCode.BAD_REQUEST, why
        else:
            log.warning("model_error", model=model.name, request_id=item.client_id, error=raw)
            code, message = ErrorCode.INTERNAL, f"model raised {raw}"
        self.metrics.on_answer(item.model, code)
        return error_body(item.client_id, code, message[:2000], key=item.rid, attempt=item.attempt,
                          model=item.model), []

    def _reply_error(self, item: WorkItem, code: str, message: str) -> None:
        body = error_body(item.client_id, code, message, key=item.rid, attempt=item.attempt, model=item.model)
        self.metrics.on_answer(item.model, code)
        self._push([(body, [])], [item])
