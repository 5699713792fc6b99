"""The worker's socket thread: registration, heartbeats, reconnects, request intake, drain.

It owns one DEALER per master (a worker registers with every master of an active-active set,
each a `MasterLink`) and the inproc PULL that carries replies from the compute thread, so
heartbeats keep flowing while a long batch runs. Each reply goes back on the link its request
came from. The worker's credit is split between the masters it hears from (`credit_share`),
so together they never send it more than its credit. A master silent for liveness x interval
is presumed dead: that link reconnects with a fresh socket and exponential backoff and
registers again (Paranoid Pirate), and its share of the credit goes to the others. A
DISCONNECT from a master (it restarted, or it evicted us) also makes that link register again.

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

from ringserve.protocol.codec import decode_tensors, pack, unpack, unpack_map
from ringserve.protocol.envelope import (
    FRAMING, MAX_PACKED_BYTES, MAX_PER_MESSAGE, Dispatch, bounded_chunks, fast_requests, packed_reply_frames,
    parse_dispatch, peer_framing, reply_frames, split_replies,
)
from ringserve.protocol.messages import (
    DISCONNECT, DRAIN, HEARTBEAT, READY, REPLY, REQUEST, WORKER_PROTO, ErrorCode, ProtocolError, error_body,
)
from ringserve.protocol.security import Security
from ringserve.protocol.sockets import drain, send_frames
from ringserve.worker.batching import Batcher, WorkItem, signature
from ringserve.worker.compute import ComputeThread
from ringserve.worker.handoff import CHANGED, read_result
from ringserve.worker.loader import BadInput, ServedModel
from ringserve.worker.metrics import WorkerMetrics

log = structlog.get_logger("ringserve.worker")

MAX_RECV_PER_TURN = 256
MAX_CHECKED = 1024  # input signatures remembered as checked (all forgotten when full: bounded whatever clients send)


@dataclass
class MasterLink:
    """One master this worker serves: its socket and the Paranoid Pirate state of that connection."""

    index: int
    endpoint: str
    dealer: zmq.Socket | None = None
    epoch: str | None = None
    last_heard: float = 0.0
    backoff: float = 0.0
    register_at: float | None = None
    reconnects: int = 0
    in_flight: int = 0
    replies: list = field(default_factory=list)  # [(count, packed headers, data frames)] handed over, not yet sent
    gone: bool = False  # told DISCONNECT while draining: nothing more to say to it
    framing: int = 1  # the REPLY framing this master reads (its HEARTBEAT says; 1 until it does)


def master_list(masters: str | list[str]) -> list[str]:
    """'tcp://a:5556,tcp://b:5556' (or a list) -> the endpoints, in order, without blanks."""
    items = masters.split(",") if isinstance(masters, str) else list(masters)
    out = [m.strip() for m in items if m and m.strip()]
    if not out:
        raise ValueError("a worker needs at least one master endpoint")
    return out


def credit_share(credit: int, live: int) -> int:
    """Each master's share of a worker's credit, so that together they never exceed it."""
    return max(1, credit // max(1, live))


@dataclass
class WorkerConfig:
    master: str  # one master endpoint, or several, comma-separated (active-active masters)
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
        self.links = [MasterLink(i, ep) for i, ep in enumerate(master_list(cfg.master))]
        self.poller = zmq.Poller()
        self.poller.register(self.results, zmq.POLLIN)
        self.in_flight = 0
        self.draining = False
        self.done = False
        self.last_beat = 0.0
        self.drain_requested: str | None = None
        self.failed: str | None = None  # why the worker left on its own (compute died or stalled)
        self.unsplittable = 0  # REQUEST messages with no readable dispatch list (reported in heartbeats)
        self.checked: dict[tuple, tuple] = {}  # (model, (name, dtype, shape) per input) -> (rows, signature), for inputs that passed
        self.sync = None  # a WeightSync thread when weights come from parameter servers
        self.compute.max_models = cfg.max_models
        self.compute.worker_name = cfg.name
        self.compute.request_load = self._request_load

    @property
    def dealer(self) -> zmq.Socket | None:
        """The first master's socket (the only one with a single master)."""
        return self.links[0].dealer

    @property
    def reconnects(self) -> int:
        return sum(link.reconnects for link in self.links)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        self.compute.start()
        if self.sync is not None:
            self.sync.name = self.cfg.name  # the name the shards' follower books file us under
            self.sync.start()
        for link in self.links:
            self._connect(link)
        try:
            while not self.done:
                events = dict(self.poller.poll(self._poll_timeout_ms()))
                if self.results in events:
                    drain(self.results, self.on_result, MAX_RECV_PER_TURN)
                    self.flush_replies()
                for link in self.links:
                    if link.dealer in events:
                        drain(link.dealer, lambda frames, link=link: self.on_master(frames, link), MAX_RECV_PER_TURN)
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
        for link in self.links:
            if link.dealer is not None:
                link.dealer.close(linger=0)
        self.results.close(linger=0)
        log.info("worker_closed", worker=self.cfg.name)

    # ------------------------------------------------------------ connection
    def _connect(self, link: MasterLink) -> None:
        if link.dealer is not None:
            self.poller.unregister(link.dealer)
            link.dealer.close(linger=0)
        dealer = link.dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, f"{self.cfg.name}-{uuid.uuid4().hex[:8]}".encode())
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, self.cfg.hwm)
        dealer.setsockopt(zmq.RCVHWM, self.cfg.hwm)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.cfg.security.client(dealer, "master")
        dealer.connect(link.endpoint)
        self.poller.register(dealer, zmq.POLLIN)
        link.last_heard = time.monotonic()
        link.framing = 1  # until this connection's master says what it reads (its first HEARTBEAT)
        self._register(link)

    def _register(self, link: MasterLink) -> None:
        info = {"name": self.cfg.name, "models": self._models_info(), "credit": self._share(),
                "device": self._device(), "pid": os.getpid(), "weight": self.cfg.weight, "framing": FRAMING}
        self._send(link, [READY, pack(info)])
        link.register_at = None
        log.info("worker_registering", worker=self.cfg.name, master=link.endpoint, models=sorted(self.models))

    def _share(self) -> int:
        """This worker's credit split between the masters that are alive: heard within liveness x
        interval, or still holding requests here."""
        expiry = self.cfg.heartbeat_interval * self.cfg.heartbeat_liveness
        now = time.monotonic()
        live = sum(1 for link in self.links if now - link.last_heard <= expiry or link.in_flight)
        return credit_share(self.cfg.effective_credit, live)

    def _device(self) -> str:
        return ",".join(sorted({str(m.device) for m in self.models.values()}))

    def _models_info(self) -> dict:
        return {name: m.describe() for name, m in self.models.items()}

    def _send(self, link: MasterLink, parts: list) -> None:
        try:
            send_frames(link.dealer, [WORKER_PROTO, *parts])
        except zmq.Again:
            log.warning("master_unreachable_message_dropped", master=link.endpoint, command=parts[0].hex())

    def _send_all(self, parts: list) -> None:
        for link in self.links:
            if not link.gone:
                self._send(link, parts)

    # ---------------------------------------------------------------- events
    def on_tick(self, now: float) -> None:
        self.check_compute(now)
        if self.done:
            return
        if self.drain_requested:
            self.start_drain(self.drain_requested)
            self.drain_requested = None
        for link in self.links:
            if link.register_at is not None and now >= link.register_at:
                self._register(link)
        if now - self.last_beat >= self.cfg.heartbeat_interval:
            self._heartbeat(now)
        for link in self.links:
            silent = now - link.last_heard
            if not link.gone and silent > self.cfg.heartbeat_interval * self.cfg.heartbeat_liveness + link.backoff:
                link.backoff = min(max(self.cfg.heartbeat_interval, link.backoff * 2), self.cfg.max_backoff)
                link.reconnects += 1
                log.warning("master_silent_reconnecting", master=link.endpoint, silent_s=round(silent, 2),
                            next_backoff_s=link.backoff)
                self._connect(link)
        if self.draining and self.in_flight == 0:
            self._send_all([DISCONNECT, pack({"reason": "drained"})])
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
        self._send_all([DISCONNECT, pack({"reason": why})])
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
        if self.unsplittable:
            stats["unsplittable_requests"] = self.unsplittable
        if len(self.links) > 1:
            stats["masters"] = len(self.links)
        share = self._share()
        for link in self.links:
            if not link.gone:
                self._send(link, [HEARTBEAT, pack({"models": models, "in_flight": link.in_flight, "stats": stats,
                                                   "draining": self.draining, "reconnects": link.reconnects,
                                                   "credit": share})])

    def _request_load(self, name: str) -> None:
        """An on-demand model is asked for: the weight-sync thread fetches its current version
        (called from the socket thread on a request, or the compute thread after an eviction)."""
        model = self.models[name]
        if model.ready or model.loading or self.sync is None:
            return
        model.loading = True
        log.info("model_load_requested", model=name)
        self.sync.request(name)

    def on_master(self, frames: list[zmq.Frame], link: MasterLink | None = None) -> None:
        link = link or self.links[0]
        if len(frames) < 2 or frames[0].bytes != WORKER_PROTO:
            log.warning("bad_master_message", frames=len(frames))
            return
        cmd = frames[1].bytes
        link.last_heard = time.monotonic()
        if cmd == REQUEST:
            self.on_requests(frames[2:], link)
        elif cmd == HEARTBEAT:
            info = unpack_map(frames[2]) if len(frames) > 2 else {}
            epoch = info.get("epoch")
            if link.epoch is not None and epoch != link.epoch:
                log.info("master_restarted", master=link.endpoint, old=link.epoch, new=epoch)
            link.epoch = epoch if isinstance(epoch, str) else None
            link.framing = peer_framing(info)  # a master that predates framing 2 gets framing 1
            self.compute.epochs[link.index] = link.epoch  # replies carry it for the client
            link.backoff = 0.0
        elif cmd == DISCONNECT:
            info = unpack_map(frames[2]) if len(frames) > 2 else {}
            if self.draining:
                link.gone = True
                if all(lk.gone for lk in self.links):
                    self.done = True
                return
            # Register again; back off if the master keeps refusing us.
            delay = 0.0 if "error" not in info else max(self.cfg.heartbeat_interval, link.backoff)
            link.register_at = time.monotonic() + delay
            log.info("master_said_disconnect", master=link.endpoint, reason=info.get("reason"),
                     error=info.get("error"))
        elif cmd == DRAIN:
            self.start_drain("master")

    def on_requests(self, frames: list[zmq.Frame], link: MasterLink | None = None) -> None:
        """A REQUEST message: each request is checked whole (routing fields, tensors, input_spec)
        before it may join a batch; the good ones go to the compute thread in one hand-over, the
        bad ones are answered BAD_REQUEST together, by key. A REQUEST with no readable dispatch
        list has no key to answer: the master is told at once (a heartbeat counting it) and
        reclaims those credit slots when their deadlines pass.
        A REQUEST the compiled checks take whole comes as plain rows (``envelope.fast_requests``: no
        Dispatch per request); anything else goes through parse_dispatch, which words every refusal."""
        link = link or self.links[0]
        now = time.monotonic()
        items, refused = [], []
        rows = fast_requests(frames)
        if rows is not None:
            work_item = self._work_item_of
            for key, attempt, model, version, timeout_ms, cid, data, arrays, _ in rows:
                try:
                    items.append(work_item(key, attempt, model, version, timeout_ms, cid, data, arrays, now, link.index))
                except Exception as exc:  # noqa: BLE001 - answered by key, as the Dispatch path answers it
                    refused.append((self._refused(key, attempt, cid, exc), ()))
        else:
            try:
                dispatched = parse_dispatch(frames)
            except ProtocolError as exc:
                self.unsplittable += 1
                log.warning("bad_request_from_master", master=link.endpoint, error=str(exc),
                            unsplittable=self.unsplittable)
                self._heartbeat(time.monotonic())
                return
            for d in dispatched:
                try:
                    if d.error is not None:
                        raise ProtocolError(d.error)
                    items.append(self._work_item(d, now, link.index))
                except Exception as exc:  # noqa: BLE001 - see _refused
                    refused.append((self._refused(d.key, d.attempt, d.cid, exc), ()))
        if items:
            self.in_flight += len(items)
            link.in_flight += len(items)
            self.compute.inbox.put(items)
        if refused:
            self._send(link, [REPLY, *reply_frames(refused)])

    def _refused(self, key: str, attempt: int, cid: str | None, exc: Exception) -> dict:
        """The BAD_REQUEST answer for one request whose checks failed: the check's own words for a
        ProtocolError or BadInput; any other exception is a check that tripped on a value it did not
        expect, still the input's fault (logged)."""
        if isinstance(exc, (ProtocolError, BadInput)):
            return error_body(cid, ErrorCode.BAD_REQUEST, str(exc), key=key, attempt=attempt)
        log.warning("request_check_failed", request_id=cid, error=f"{type(exc).__name__}: {exc}")
        return error_body(cid, ErrorCode.BAD_REQUEST, f"malformed request ({type(exc).__name__}: {str(exc)[:200]})",
                          key=key, attempt=attempt)

    def _work_item(self, d: Dispatch, now: float, link: int = 0) -> WorkItem:
        inputs = d.arrays  # decoded by parse_dispatch where its compiled path took the REQUEST
        if inputs is None:
            if d.model not in self.models:  # before the tensors: the answer names the model, as it always did
                raise ProtocolError(f"this worker does not serve model {d.model!r}")
            inputs = decode_tensors(d.header.get("inputs"), d.frames)
        return self._work_item_of(d.key, d.attempt, d.model, d.version, d.timeout_ms, d.cid, d.frames, inputs, now, link)

    def _work_item_of(self, key: str, attempt: int, name: str, version: int | None, timeout_ms: float, cid: str | None,
                      frames: list, inputs: dict, now: float, link: int) -> WorkItem:
        """One checked request's WorkItem (its routing fields checked by protocol/, its inputs here)."""
        model = self.models.get(name)
        if model is None:
            raise ProtocolError(f"this worker does not serve model {name!r}")
        rows, sig = self._check_inputs(model, inputs)
        if model.on_demand and not model.ready:
            self._request_load(model.name)  # the request waits in the batcher until it is loaded
        # 0 means already expired: TIMEOUT without compute
        timeout_s = min(max(timeout_ms, 0.0) / 1000.0, 3600.0)
        return WorkItem(key, attempt, name, version, inputs, rows, now, now + timeout_s, frames, cid=cid, link=link,
                        sig=sig)

    def _check_inputs(self, model: ServedModel, inputs: dict) -> tuple[int, tuple | None]:
        """model.check_inputs, asked once per input signature: what it checks (names, dtypes, shapes
        against the model's fixed input_spec) is a function of the signature alone, and under load
        every request of a model has the same one (its check was a fifth of the socket thread's time).
        Returns (rows, the batching signature or None), the signature remembered with the verdict so
        that the compute thread's batcher need not build it per request (``batching.signature``;
        None for ragged models, whose batcher pads and keys by length).
        A model with stages checks against its current version's preprocess, so it is asked every time;
        so is any input that fails (the error is raised, never remembered)."""
        if model.has_stages:
            return model.check_inputs(inputs), None
        key = (model.name, tuple([(n, a.dtype, a.shape) for n, a in inputs.items()]))  # a list: a third cheaper than a genexpr
        known = self.checked.get(key)
        if known is None:
            known = (model.check_inputs(inputs), None if model.ragged is not None else signature(inputs))
            if len(self.checked) >= MAX_CHECKED:
                self.checked.clear()
            self.checked[key] = known
        return known

    def on_result(self, frames: list[zmq.Frame]) -> None:
        kind = frames[0].bytes
        result = read_result(kind)
        if result is not None:  # [RESULT count link][packed headers][data frames] (worker/handoff.py)
            count, link = result[0], self.links[result[1]]
            self.in_flight -= count
            link.in_flight -= count
            link.replies.append((count, frames[1], frames[2:]))
        elif kind == CHANGED:
            self._heartbeat(time.monotonic())

    def flush_replies(self) -> None:
        """Every reply handed over in this turn goes to its master in one REPLY (or a few: at most
        MAX_PER_MESSAGE replies, and MAX_PACKED_BYTES of packed headers, each), in the framing that
        master said it reads. Framing 2: a turn's one part is sent as it came (its headers are
        already the REPLY's first frame); several parts have their header lists joined."""
        for link in self.links:
            if not link.replies:
                continue
            parts, link.replies = link.replies, []
            for chunk in bounded_chunks(parts, MAX_PER_MESSAGE, MAX_PACKED_BYTES, size=lambda p: len(p[1]),
                                        count=lambda p: p[0]):
                for frames in self._reply_messages(chunk, link.framing >= 2):
                    self._send(link, [REPLY, *frames])

    @staticmethod
    def _reply_messages(chunk: list, packed: bool) -> list[list]:
        """The REPLY bodies for one chunk of handed-over parts (one, unless repacking our own frames
        fails: a bug, logged, and each part then goes alone as it came, packed, which every master
        since framing 2 reads, rather than drop its answers)."""
        try:
            if packed:
                if len(chunk) == 1:
                    return [[chunk[0][1], *chunk[0][2]]]
                headers = [h for _, hs, _ in chunk for h in unpack(hs)]
                return [packed_reply_frames(headers, [f for p in chunk for f in p[2]])]
            # framing 1 (a master from before framing 2): each reply's header in its own frame
            return [[f for _, hs, data in chunk for raw, _, fs in split_replies([hs, *data]) for f in (raw, *fs)]]
        except ProtocolError as exc:
            log.error("reply_repack_failed", error=str(exc))
            return [[hs, *data] for _, hs, data in chunk]

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
