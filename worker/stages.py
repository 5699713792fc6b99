"""Pre- and post-processing stages, per request, in a small pool off the compute thread.

A model's spec may name ``preprocess=module:function`` and ``postprocess=module:function``
(stage factories, built once per model version: worker/loader.py ``Stages``). The stages run here, in
``--stage-threads`` threads, so the model keeps computing while the next requests are
tokenized and the last ones pooled:

    preprocess(inputs)            -> the model's inputs   (before batching; checked against input_spec)
    postprocess(outputs, inputs)  -> the request's answer (after the batch is split; `inputs` are
                                     the model's inputs of that request, e.g. its attention mask)

A request is tokenized, computed and pooled by one version: preprocess runs the stages of the
version the request pins (else the current one) and notes it (``WorkItem.stage_version``); the
compute thread runs it on that version, or sends it back here to be preprocessed again when that
version has been swapped out meanwhile; postprocess runs the stages of the version its batch ran on.

Every request in a stage gets exactly one answer: its stage's result goes on (to the batcher,
or encoded to the master), or one error for that request alone: ``BadInput`` raised by the stage
(or text that is not UTF-8) is BAD_REQUEST, any other exception or a result of the wrong type
INTERNAL, and a stage still running at the request's deadline TIMEOUT. A stage that hangs
keeps its thread; the watchdog answers the request, and a new thread takes the hung one's
place (at most ``MAX_REPLACED`` times, so a stage that hangs on every request cannot make
threads without end). Each thread has its own PUSH socket to the socket thread's PULL
(a socket belongs to one thread), so answers from here never wait for the compute thread.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import structlog
import zmq

from ringserve.protocol.codec import encode_tensors, to_numpy
from ringserve.protocol.messages import ErrorCode, ProtocolError, error_body
from ringserve.worker.batching import WorkItem
from ringserve.worker.handoff import result_frames
from ringserve.worker.loader import BadInput, ServedModel, Stages, TooLong
from ringserve.worker.metrics import WorkerMetrics

log = structlog.get_logger("ringserve.worker.stages")

PRE, POST = "preprocess", "postprocess"
WATCH_S = 0.02  # how often the watchdog looks for stages past their request's deadline
MAX_REPLACED = 16  # threads a pool may start in place of hung ones, over its life


class StageFailed(Exception):
    """One request's stage failed: `code` and a message for that request alone."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Task:
    stage: str
    model: ServedModel
    item: WorkItem
    outputs: Mapping[str, np.ndarray] | None = None  # postprocess: this request's share of the batch
    header: dict | None = None  # postprocess: the result header, outputs and timing still to fill in
    stages: Stages | None = None  # postprocess: the stages of the version the batch ran on


def stage_failure(stage: str, exc: BaseException) -> StageFailed:
    """BAD_REQUEST when the input is the cause (BadInput, text that is not UTF-8), else INTERNAL."""
    if isinstance(exc, StageFailed):
        return exc
    if isinstance(exc, BadInput):
        return StageFailed(ErrorCode.BAD_REQUEST, str(exc)[:2000])
    if isinstance(exc, UnicodeDecodeError):
        return StageFailed(ErrorCode.BAD_REQUEST, f"{stage}: input is not valid UTF-8 ({exc})"[:2000])
    return StageFailed(ErrorCode.INTERNAL, f"{stage} raised {type(exc).__name__}: {exc}"[:2000])


def as_arrays(stage: str, value: Any) -> dict[str, np.ndarray]:
    """A stage's result as {name: numpy array}; StageFailed (INTERNAL) if it is anything else."""
    if not isinstance(value, Mapping) or not value:
        raise StageFailed(ErrorCode.INTERNAL, f"{stage} returned {type(value).__name__}; expected a non-empty "
                                              "dict of name -> numpy array")
    out = {}
    for name, arr in value.items():
        if not isinstance(name, str):
            raise StageFailed(ErrorCode.INTERNAL, f"{stage} returned a key of type {type(name).__name__}; "
                                                  "names must be strings")
        if isinstance(arr, np.ndarray):
            out[name] = arr
        elif hasattr(arr, "detach"):  # a torch tensor
            try:
                out[name] = to_numpy(arr)
            except ProtocolError as exc:
                raise StageFailed(ErrorCode.INTERNAL, f"{stage} returned {name!r}: {exc}") from None
        else:
            raise StageFailed(ErrorCode.INTERNAL, f"{stage} returned {name!r} as {type(arr).__name__}; "
                                                  "expected a numpy array")
    return out


class StagePool:
    """`threads` stage threads and a watchdog; `deliver(item)` takes a preprocessed request on to
    the batcher (the compute thread's inbox)."""

    def __init__(self, ctx: zmq.Context, results_endpoint: str, threads: int, metrics: WorkerMetrics,
                 deliver: Callable[[WorkItem], None]):
        if threads < 1:
            raise ValueError("stage threads must be >= 1")
        self.ctx, self.endpoint, self.size, self.metrics, self.deliver = ctx, results_endpoint, threads, metrics, deliver
        self.cond = threading.Condition()
        self.tasks: collections.deque[Task] = collections.deque()  # bounded by the worker's credit
        self.running: dict[int, tuple[Task, threading.Thread]] = {}  # id(task) -> (task, its thread)
        self.abandoned: set[threading.Thread] = set()  # threads left running a hung stage
        self.replaced = 0
        self.stopping = threading.Event()
        self.counts = {"timeouts": 0, "errors": 0}
        self.coming: collections.Counter[str] = collections.Counter()  # model -> requests in preprocess (the batcher waits for them)

    def start(self) -> None:
        for _ in range(self.size):
            self._spawn()
        threading.Thread(target=self._watch, name="ringserve-stage-watch", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()

    def submit(self, task: Task) -> None:
        with self.cond:
            self.tasks.append(task)
            if task.stage == PRE:
                self.coming[task.item.model] += 1
            self.cond.notify()

    def _gone(self, task: Task) -> None:
        """A preprocess task is done (or answered by the watchdog): it is no longer coming. Under `cond`."""
        if task.stage == PRE:
            self.coming[task.item.model] -= 1
            if self.coming[task.item.model] <= 0:
                del self.coming[task.item.model]

    def _spawn(self) -> None:
        threading.Thread(target=self._work, name="ringserve-stage", daemon=True).start()

    def _socket(self) -> zmq.Socket:
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self.endpoint)
        return push

    # ------------------------------------------------------------------ threads
    def _work(self) -> None:
        me, push = threading.current_thread(), self._socket()
        try:
            while True:
                with self.cond:
                    while not self.tasks and not self.stopping.is_set() and me not in self.abandoned:
                        self.cond.wait(0.5)
                    if self.stopping.is_set() or me in self.abandoned:
                        return
                    task = self.tasks.popleft()
                    self.running[id(task)] = (task, me)
                try:
                    outcome = self._run(task)
                except Exception as exc:  # noqa: BLE001 - _run catches the stage's own; this is a bug of ours
                    log.exception("stage_bug", stage=task.stage, request_id=task.item.client_id)
                    outcome = StageFailed(ErrorCode.INTERNAL, f"{task.stage} failed: {type(exc).__name__}: {exc}")
                with self.cond:
                    mine = self.running.pop(id(task), None) is not None
                    if mine:
                        self._gone(task)
                if mine:  # else the watchdog answered TIMEOUT: the result is dropped
                    self._finish(push, task, outcome)
        finally:
            with self.cond:
                self.abandoned.discard(me)
            push.close(linger=0)

    def _watch(self) -> None:
        push = self._socket()
        try:
            while not self.stopping.wait(WATCH_S):
                now = time.monotonic()
                with self.cond:
                    late = [(k, t, th) for k, (t, th) in self.running.items() if t.item.deadline <= now]
                    for k, task, thread in late:
                        del self.running[k]
                        self._gone(task)
                        self.abandoned.add(thread)  # it leaves once its stage returns, if ever
                    waiting = [t for t in self.tasks if t.item.deadline <= now]
                    if waiting:
                        self.tasks = collections.deque(t for t in self.tasks if t.item.deadline > now)
                        for task in waiting:
                            self._gone(task)
                for _, task, _ in late:
                    self._timeout(push, task, f"{task.stage} was still running at the request's deadline")
                    if self.replaced < MAX_REPLACED:
                        self.replaced += 1
                        self._spawn()
                    log.warning("stage_hung", stage=task.stage, model=task.item.model, request_id=task.item.client_id,
                                replaced=self.replaced)
                for task in waiting:
                    self._timeout(push, task, f"deadline passed before {task.stage} started")
        finally:
            push.close(linger=0)

    # ------------------------------------------------------------------- stages
    def _run(self, task: Task) -> Any:
        """Run one stage; its result, or StageFailed for this request."""
        t0 = time.monotonic()
        try:
            if task.stage == PRE:
                return self._preprocess(task)
            return self._postprocess(task)
        except Exception as exc:  # noqa: BLE001 - the stage is user code: any failure fails its request alone
            return stage_failure(task.stage, exc)
        finally:
            took = time.monotonic() - t0
            task.item.timing[f"{task.stage}_ms"] = round(1000 * took, 3)
            self.metrics.on_stage(task.item.model, task.stage, took)

    def _preprocess(self, task: Task) -> WorkItem:
        item, model = task.item, task.model
        stages = model.stages_for(item.version)  # the pinned version's, else the current one's
        if item.raw is None:
            item.raw = item.inputs  # kept: a request whose version is swapped out is preprocessed again
        inputs = as_arrays(PRE, stages.pre(item.raw))
        try:
            rows = model.check_model_inputs(inputs)
        except TooLong:
            raise
        except BadInput as exc:  # the stage made something the model cannot take
            raise StageFailed(ErrorCode.INTERNAL, f"preprocess output does not fit model {model.name!r}: {exc}") from None
        item.inputs, item.rows, item.staged, item.stage_version = inputs, rows, True, stages.version
        return item

    def _postprocess(self, task: Task) -> tuple[dict, list]:
        item, model = task.item, task.model
        stages = task.stages or model.stages_for(task.header.get("version") if task.header else None)
        outputs = as_arrays(POST, stages.post(dict(task.outputs), item.inputs))
        try:
            meta, frames = encode_tensors(outputs)
        except ProtocolError as exc:
            raise StageFailed(ErrorCode.INTERNAL, f"postprocess returned outputs the wire cannot carry: {exc}") from None
        return {**task.header, "outputs": meta}, frames

    def _finish(self, push: zmq.Socket, task: Task, outcome: Any) -> None:
        item = task.item
        if isinstance(outcome, StageFailed):
            self.counts["errors"] += 1
            self._error(push, item, outcome.code, outcome.message)
            return
        if task.stage == PRE:
            item.arrival = time.monotonic()  # its queue time starts now, in the batcher
            self.deliver(item)
            return
        header, frames = outcome
        header["timing"] = {**header.get("timing", {}), **item.timing}
        self.metrics.on_answers(item.model, "ok", 1)
        self._send(push, item, [(header, frames)])

    def _timeout(self, push: zmq.Socket, task: Task, message: str) -> None:
        self.counts["timeouts"] += 1
        self._error(push, task.item, ErrorCode.TIMEOUT, message)

    def _error(self, push: zmq.Socket, item: WorkItem, code: str, message: str) -> None:
        log.info("stage_failed", model=item.model, request_id=item.client_id, code=code, error=message[:300])
        self.metrics.on_answer(item.model, code)
        body = error_body(item.client_id, code, message, key=item.rid, attempt=item.attempt, model=item.model)
        self._send(push, item, [(body, [])])

    @staticmethod
    def _send(push: zmq.Socket, item: WorkItem, replies: list) -> None:
        """A RESULT to the socket thread (worker/handoff.py), for the master link the request came from."""
        push.send_multipart(result_frames(item.link, replies), copy=False)


class Inbox(queue.Queue):
    """The compute thread's inbox: the socket thread's ``put(items)`` sends requests of a model with
    a preprocess stage to the pool first; they come back through ``put_ready`` once preprocessed."""

    def __init__(self) -> None:
        super().__init__()
        self.route: Callable[[list], list] | None = None  # set when a pool exists: returns the items to queue now

    def put(self, items, block: bool = True, timeout: float | None = None) -> None:  # type: ignore[override]
        route = self.route
        if route is not None and items:
            items = route(items)
            if not items:
                return
        super().put(items, block, timeout)

    def put_ready(self, items: list) -> None:
        super().put(items)
