"""The worker's socket thread: registration, heartbeats, reconnects, request intake, drain.

It owns the DEALER to the master and the inproc PULL that carries replies from the compute
thread, so heartbeats keep flowing while a long batch runs. A master silent for
liveness x interval is presumed dead: the worker reconnects with a fresh socket and
exponential backoff and registers again (Paranoid Pirate). A DISCONNECT from the master
(it restarted, or it evicted us) also makes the worker register again.

If the compute thread dies, or one batch runs longer than ``compute_stall_s``, heartbeats
alone would keep a useless worker registered and every request sent to it would time out;
so the worker sends DISCONNECT (the master requeues its in-flight work elsewhere) and exits.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass, field

import structlog
import zmq

from ringserve.protocol.codec import decode_tensors, pack, unpack_map
from ringserve.protocol.envelope import Dispatch, parse_dispatch, reply_frames
from ringserve.protocol.messages import (
    DISCONNECT, DRAIN, HEARTBEAT, READY, REPLY, REQUEST, WORKER_PROTO, ErrorCode, ProtocolError, error_body,
)
from ringserve.protocol.security import Security
from ringserve.protocol.sockets import drain, send_frames
from ringserve.worker.batching import Batcher, WorkItem
from ringserve.worker.compute import CHANGED, RESULT, ComputeThread
from ringserve.worker.loader import BadInput, ServedModel
from ringserve.worker.metrics import WorkerMetrics

log = structlog.get_logger("ringserve.worker")

MAX_RECV_PER_TURN = 256


@dataclass
class WorkerConfig:
    master: str
    name: str = field(default_factory=lambda: f"worker-{os.getpid()}")
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    max_backoff: float = 32.0
    max_batch_size: int = 32  # the command line's defaults (launch/worker.py)
    max_queue_delay_s: float = 0.0
    batch_idle_gap_s: float | None = None  # run a batch that has not grown for this long (None: the delay)
    credit: int | None = None
    weight: float = 1.0
    hwm: int = 10_000
    max_models: int = 0  # > 0: models load on their first request; the LRU beyond this are unloaded
    security: Security = field(default_factory=Security)  # keys, MAXMSGSIZE (protocol/security.py)
    compute_stall_s: float = 300.0  # one batch running longer than this means the worker is stuck

    @property
    def effective_credit(self) -> int:
        """Enough requests in flight to fill one batch while the previous one runs."""
        return self.credit or max(4, 2 * self.max_batch_size)


class WorkerAgent:
    def __init__(self, cfg: WorkerConfig, models: dict[str, ServedModel], ctx: zmq.Context | None = None):
        self.cfg, self.models = cfg, models
        self.ctx = ctx or zmq.Context()
        self.results = self.ctx.socket(zmq.PULL)
        self.results.setsockopt(zmq.LINGER, 0)
        self.results_ep = f"inproc://ringserve-results-{uuid.uuid4().hex}"
        self.results.bind(self.results_ep)
        self.metrics = WorkerMetrics()
        self.compute = ComputeThread(self.ctx, self.results_ep, models,
                                     Batcher(cfg.max_batch_size, cfg.max_queue_delay_s, idle_gap_s=cfg.batch_idle_gap_s), self.metrics)
        self.dealer: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self.poller.register(self.results, zmq.POLLIN)
        self.in_flight = 0
        self.replies: list = []  # REPLY frames taken from the compute thread, not yet sent
        self.draining = False
        self.done = False
        self.master_epoch: str | None = None
        self.last_heard = self.last_beat = 0.0
        self.backoff = 0.0
        self.register_at: float | None = None
        self.reconnects = 0
        self.drain_requested: str | None = None
        self.failed: str | None = None  # why the worker left on its own (compute died or stalled)
        self.sync = None  # a WeightSync thread when weights come from parameter servers
        self.compute.max_models = cfg.max_models
        self.compute.worker_name = cfg.name
        self.compute.request_load = self._request_load

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        self.compute.start()
        if self.sync is not None:
            self.sync.name = self.cfg.name  # the name the shards' follower books file us under
            self.sync.start()
        self._connect()
        try:
            while not self.done:
                events = dict(self.poller.poll(self._poll_timeout_ms()))
                if self.results in events:
                    drain(self.results, self.on_result, MAX_RECV_PER_TURN)
                    self.flush_replies()
                if self.dealer in events:
                    drain(self.dealer, self.on_master, MAX_RECV_PER_TURN)
                self.on_tick(time.monotonic())
        finally:
            self.close()

    def _poll_timeout_ms(self) -> int:
        return max(1, int(self.cfg.heartbeat_interval * 1000 / 4))

    def close(self) -> None:
        if self.sync is not None:
            self.sync.stopping.set()
            self.sync.join(timeout=5)
        self.compute.stopping.set()
        self.compute.wake()  # ends its idle wait now: it sees `stopping` at once
        if self.failed is None:  # a stuck compute thread would never join: it is a daemon, leave it
            self.compute.join(timeout=5)
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self.results.close(linger=0)
        log.info("worker_closed", worker=self.cfg.name)

    # ------------------------------------------------------------ connection
    def _connect(self) -> None:
        if self.dealer is not None:
            self.poller.unregister(self.dealer)
            self.dealer.close(linger=0)
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.IDENTITY, f"{self.cfg.name}-{uuid.uuid4().hex[:8]}".encode())
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.SNDHWM, self.cfg.hwm)
        self.dealer.setsockopt(zmq.RCVHWM, self.cfg.hwm)
        self.dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        self.dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.cfg.security.client(self.dealer, "master")
        self.dealer.connect(self.cfg.master)
        self.poller.register(self.dealer, zmq.POLLIN)
        self.last_heard = time.monotonic()
        self._register()

    def _register(self) -> None:
        info = {"name": self.cfg.name, "models": self._models_info(), "credit": self.cfg.effective_credit,
                "device": self._device(), "pid": os.getpid(), "weight": self.cfg.weight}
        self._send([READY, pack(info)])
        self.register_at = None
        log.info("worker_registering", worker=self.cfg.name, master=self.cfg.master, models=sorted(self.models))

    def _device(self) -> str:
        return ",".join(sorted({str(m.device) for m in self.models.values()}))

    def _models_info(self) -> dict:
        return {name: m.describe() for name, m in self.models.items()}

    def _send(self, parts: list) -> None:
        try:
            send_frames(self.dealer, [WORKER_PROTO, *parts])
        except zmq.Again:
            log.warning("master_unreachable_message_dropped", command=parts[0].hex())

    # ---------------------------------------------------------------- events
    def on_tick(self, now: float) -> None:
        self.check_compute(now)
        if self.done:
            return
        if self.drain_requested:
            self.start_drain(self.drain_requested)
            self.drain_requested = None
        if self.register_at is not None and now >= self.register_at:
            self._register()
        if now - self.last_beat >= self.cfg.heartbeat_interval:
            self._heartbeat(now)
        silent = now - self.last_heard
        if silent > self.cfg.heartbeat_interval * self.cfg.heartbeat_liveness + self.backoff:
            self.backoff = min(max(self.cfg.heartbeat_interval, self.backoff * 2), self.cfg.max_backoff)
            self.reconnects += 1
            log.warning("master_silent_reconnecting", silent_s=round(silent, 2), next_backoff_s=self.backoff)
            self._connect()
        if self.draining and self.in_flight == 0:
            self._send([DISCONNECT, pack({"reason": "drained"})])
            log.info("worker_drained", worker=self.cfg.name)
            self.done = True

    def check_compute(self, now: float) -> None:
        """Leave (DISCONNECT, then exit) when the compute thread is dead or stuck on one batch."""
        if self.done or self.failed:
            return
        busy = self.compute.busy_since
        if not self.compute.is_alive():
            self.leave("compute thread died")
        elif busy is not None and now - busy > self.cfg.compute_stall_s:
            self.leave(f"one batch made no progress for {now - busy:.1f}s (limit {self.cfg.compute_stall_s}s)")

    def leave(self, why: str) -> None:
        log.error("worker_leaving", worker=self.cfg.name, reason=why, in_flight=self.in_flight)
        self._send([DISCONNECT, pack({"reason": why})])
        self.failed = why
        self.done = True

    def _heartbeat(self, now: float) -> None:
        self.last_beat = now
        models = self._models_info()
        self.metrics.refresh(models)
        stats = self.compute.stats.snapshot()
        if self.cfg.max_models:  # on-demand models: the master prefers workers with room
            stats.update(models_loaded=sum(1 for m in self.models.values() if m.ready), max_models=self.cfg.max_models,
                         model_loads=sum(m.loads for m in self.models.values()),
                         model_evictions=sum(m.evictions for m in self.models.values()))
        self._send([HEARTBEAT, pack({"models": models, "in_flight": self.in_flight, "stats": stats,
                                     "draining": self.draining, "reconnects": self.reconnects})])

    def _request_load(self, name: str) -> None:
        """An on-demand model is asked for: the weight-sync thread fetches its current version
        (called from the socket thread on a request, or the compute thread after an eviction)."""
        model = self.models[name]
        if model.ready or model.loading or self.sync is None:
            return
        model.loading = True
        log.info("model_load_requested", model=name)
        self.sync.request(name)

    def on_master(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2 or frames[0].bytes != WORKER_PROTO:
            log.warning("bad_master_message", frames=len(frames))
            return
        cmd = frames[1].bytes
        self.last_heard = time.monotonic()
        if cmd == REQUEST:
            self.on_requests(frames[2:])
        elif cmd == HEARTBEAT:
            info = unpack_map(frames[2]) if len(frames) > 2 else {}
            epoch = info.get("epoch")
            if self.master_epoch is not None and epoch != self.master_epoch:
                log.info("master_restarted", old=self.master_epoch, new=epoch)
            self.master_epoch = epoch
            self.compute.epoch = epoch if isinstance(epoch, str) else None  # replies carry it for the client
            self.backoff = 0.0
        elif cmd == DISCONNECT:
            info = unpack_map(frames[2]) if len(frames) > 2 else {}
            if self.draining:
                self.done = True
                return
            # Register again; back off if the master keeps refusing us.
            delay = 0.0 if "error" not in info else max(self.cfg.heartbeat_interval, self.backoff)
            self.register_at = time.monotonic() + delay
            log.info("master_said_disconnect", reason=info.get("reason"), error=info.get("error"))
        elif cmd == DRAIN:
            self.start_drain("master")

    def on_requests(self, frames: list[zmq.Frame]) -> None:
        """A REQUEST message: each request is checked whole (routing fields, tensors, input_spec)
        before it may join a batch; the good ones go to the compute thread in one hand-over, the
        bad ones are answered BAD_REQUEST together."""
        try:
            dispatched = parse_dispatch(frames)
        except ProtocolError as exc:
            log.warning("bad_request_from_master", error=str(exc))
            return
        now = time.monotonic()
        items, refused = [], []
        for d in dispatched:
            try:
                if d.error is not None:
                    raise ProtocolError(d.error)
                items.append(self._work_item(d, now))
            except (ProtocolError, BadInput) as exc:
                refused.append((error_body(d.rid, ErrorCode.BAD_REQUEST, str(exc), attempt=d.attempt), ()))
            except Exception as exc:  # a check that trips on a value it did not expect: still the input's fault
                log.warning("request_check_failed", request_id=d.rid, error=f"{type(exc).__name__}: {exc}")
                refused.append((error_body(d.rid, ErrorCode.BAD_REQUEST,
                                           f"malformed request ({type(exc).__name__}: {str(exc)[:200]})",
                                           attempt=d.attempt), ()))
        if items:
            self.in_flight += len(items)
            self.compute.inbox.put(items)
        if refused:
            self._send([REPLY, *reply_frames(refused)])

    def _work_item(self, d: Dispatch, now: float) -> WorkItem:
        model = self.models.get(d.model)
        if model is None:
            raise ProtocolError(f"this worker does not serve model {d.model!r}")
        inputs = decode_tensors(d.header.get("inputs"), d.frames)
        rows = model.check_inputs(inputs)
        if model.on_demand and not model.ready:
            self._request_load(model.name)  # the request waits in the batcher until it is loaded
        # 0 means already expired: TIMEOUT without compute
        timeout_s = min(max(d.timeout_ms, 0.0) / 1000.0, 3600.0)
        return WorkItem(d.rid, d.attempt, model.name, d.version, inputs, rows, arrival=now, deadline=now + timeout_s,
                        keepalive=d.frames)

    def on_result(self, frames: list[zmq.Frame]) -> None:
        kind = frames[0].bytes
        if kind == RESULT:  # [RESULT][count][REPLY frames of `count` replies]: sent at the end of the drain
            self.in_flight -= int(frames[1].bytes)
            self.replies.extend(frames[2:])
        elif kind == CHANGED:
            self._heartbeat(time.monotonic())

    def flush_replies(self) -> None:
        """Every reply the compute thread handed over in this turn goes to the master in one REPLY."""
        if self.replies:
            replies, self.replies = self.replies, []
            self._send([REPLY, *replies])

    def start_drain(self, why: str) -> None:
        if not self.draining:
            log.info("worker_draining", worker=self.cfg.name, why=why, in_flight=self.in_flight)
            self.draining = True
            self._heartbeat(time.monotonic())

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):  # only set a flag: the socket belongs to the loop
            self.drain_requested = signal.Signals(signum).name

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
