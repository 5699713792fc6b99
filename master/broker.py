"""The master's event loop: three ROUTER sockets, one zmq.Poller, no thread per request.

Methods are named after protocol events (Majordomo style): ``on_client``, ``on_worker``,
``on_admin``, ``on_reply``, ``on_ready``, ``on_heartbeat``. Decisions live elsewhere:
which worker gets a request is ``scheduler``'s, who is dead is ``liveness``'s. This loop only
moves frames and keeps the books so that every request gets exactly one final answer.
With --keys each socket admits only its own role, re-checked per message (``_allowed``;
rules in protocol/security.py), and ``_within_rate`` applies the per-client token bucket.
"""
from __future__ import annotations

import errno
import heapq
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import structlog
import zmq

from ringserve.master import liveness
from ringserve.master.ratelimit import RateLimiter
from ringserve.master.registry import AnsweredCache, ModelCounters, ModelQueues, PendingRequest, WorkerRecord
from ringserve.master.scheduler import Load, make_policy
from ringserve.master.status import build_status
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.envelope import parse_request_header
from ringserve.protocol.security import Security, user_id
from ringserve.protocol.sockets import drain
from ringserve.protocol.messages import (
    DISCONNECT, DRAIN, HEARTBEAT, MDP_CLIENT, MMI_PING, MMI_SERVICE, READY, REPLY, REQUEST,
    WORKER_COMMANDS, WORKER_PROTO, ErrorCode, ProtocolError, error_body,
)

log = structlog.get_logger("ringserve.master")

MAX_BATCH_RECV = 256  # messages read from one socket per loop turn, so no socket starves the others


@dataclass
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:*"
    backend: str = "tcp://127.0.0.1:*"
    admin: str = "tcp://127.0.0.1:*"
    policy: str = "least-outstanding"
    weights: dict[str, float] = field(default_factory=dict)  # worker name -> weight
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    max_queue: int = 1000
    max_attempts: int = 3
    default_timeout: float = 30.0
    hwm: int = 10_000
    drain_timeout: float = 10.0
    seed: int | None = None
    security: Security = field(default_factory=Security)  # keys, MAXMSGSIZE (protocol/security.py)
    rate_limit: float = 0.0  # requests per second per client (0: no limit)
    rate_burst: float | None = None


def _router(ctx: zmq.Context, endpoint: str, hwm: int, sec: Security, domain: str) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(zmq.ROUTER)
    sec.server(sock, domain)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer raises instead of dropping silently
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.bind(endpoint)
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


class Broker:
    def __init__(self, cfg: BrokerConfig, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.ctx = ctx or zmq.Context()
        self.epoch = uuid.uuid4().hex[:12]
        self.policy = make_policy(cfg.policy, cfg.seed)
        self.workers: dict[bytes, WorkerRecord] = {}
        self.pending: dict[str, PendingRequest] = {}
        self.queues = ModelQueues(cfg.max_queue)
        self.answered = AnsweredCache()
        self.counters: dict[str, ModelCounters] = {}
        self.deadlines: list[tuple[float, str]] = []
        self.late_replies = 0
        self.stopping = False
        self.stop_deadline = 0.0
        self.started = time.time()
        self.last_heartbeat = 0.0
        # After a (re)start, live workers need up to liveness x interval to register again:
        # until then a request for a model we do not know yet waits instead of failing.
        self.grace_until = time.monotonic() + liveness.expiry(cfg.heartbeat_interval, cfg.heartbeat_liveness)
        self.in_grace = True
        self.limiter = RateLimiter(cfg.rate_limit, cfg.rate_burst) if cfg.rate_limit > 0 else None
        self.refused = 0  # messages from peers not (or no longer) allowed on that socket
        self.frontend, self.frontend_ep = _router(self.ctx, cfg.frontend, cfg.hwm, cfg.security, "master.client")
        self.backend, self.backend_ep = _router(self.ctx, cfg.backend, cfg.hwm, cfg.security, "master.worker")
        self.admin, self.admin_ep = _router(self.ctx, cfg.admin, 1000, cfg.security, "master.admin")
        self.poller = zmq.Poller()
        for sock in (self.frontend, self.backend, self.admin):
            self.poller.register(sock, zmq.POLLIN)

    @property
    def endpoints(self) -> dict[str, str]:
        return {"frontend": self.frontend_ep, "backend": self.backend_ep, "admin": self.admin_ep}

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        log.info("master_started", epoch=self.epoch, policy=self.cfg.policy, **self.endpoints)
        try:
            while not self._finished():
                events = dict(self.poller.poll(self._poll_timeout_ms()))
                for sock, handler in ((self.backend, self.on_worker), (self.frontend, self.on_client),
                                      (self.admin, self.on_admin)):
                    if sock in events:
                        drain(sock, handler, MAX_BATCH_RECV)
                self.on_tick(time.monotonic())
        finally:
            self.close()

    def request_stop(self, *_: object) -> None:
        """SIGTERM/SIGINT: refuse new work, let in-flight work finish, then leave."""
        if not self.stopping:
            log.info("master_stopping", pending=len(self.pending))
            self.stopping = True
            self.stop_deadline = time.monotonic() + self.cfg.drain_timeout

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def close(self) -> None:
        for sock in (self.frontend, self.backend, self.admin):
            sock.close(linger=0)
        log.info("master_closed", pending=len(self.pending))

    def _finished(self) -> bool:
        if not self.stopping:
            return False
        if not self.pending:
            return True
        if time.monotonic() >= self.stop_deadline:
            for req in list(self.pending.values()):
                self.fail(req, ErrorCode.OVERLOADED, "master shut down before the request finished")
            return True
        return False

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        nxt = self.last_heartbeat + self.cfg.heartbeat_interval
        if self.workers:  # wake for the earliest possible eviction, not just the next heartbeat
            expiry = liveness.expiry(self.cfg.heartbeat_interval, self.cfg.heartbeat_liveness)
            nxt = min(nxt, min(w.last_seen for w in self.workers.values()) + expiry)
        if self.deadlines:
            nxt = min(nxt, self.deadlines[0][0])
        return max(0, min(int((nxt - now) * 1000) + 1, 1000))

    def on_tick(self, now: float) -> None:
        self._expire_deadlines(now)
        if self.in_grace and now >= self.grace_until:
            self.in_grace = False
            self._fail_orphans()
        if liveness.heartbeat_due(self.last_heartbeat, now, self.cfg.heartbeat_interval):
            self.last_heartbeat = now
            beat = pack({"epoch": self.epoch})
            for w in list(self.workers.values()):
                self._send_worker(w, [HEARTBEAT, beat])
        seen = {ident: w.last_seen for ident, w in self.workers.items()}
        for ident in liveness.missed(seen, now, self.cfg.heartbeat_interval, self.cfg.heartbeat_liveness):
            w = self.workers.get(ident)
            if w is not None:
                self.evict(w, "heartbeat_expired", tell=True)

    # --------------------------------------------------------------- clients
    def on_client(self, frames: Sequence[zmq.Frame]) -> None:
        ident = frames[0].bytes
        if not self._allowed(frames, "client") or not self._within_rate(ident, frames):
            return
        if len(frames) < 4 or frames[1].bytes != b"" or frames[2].bytes != MDP_CLIENT:
            self._reply_client(ident, b"", error_body(None, ErrorCode.BAD_REQUEST,
                               "expected [empty][MDPC01][service][body...] (ZeroMQ RFC 7)"))
            return
        service, body = frames[3].bytes, frames[4:]
        try:
            model = service.decode("utf-8")
        except UnicodeDecodeError:
            self._reply_client(ident, service, error_body(None, ErrorCode.BAD_REQUEST, "service name is not UTF-8"))
            return
        if model.startswith("mmi."):
            self.on_mmi(ident, service, model, body)
            return
        rid = None
        try:
            if not body:
                raise ProtocolError("missing request body")
            header = unpack_map(body[0])
            rid = header.get("id") if isinstance(header.get("id"), str) else None
            parsed = parse_request_header(header, body[1:])
        except ProtocolError as exc:
            self._reply_client(ident, service, error_body(rid, ErrorCode.BAD_REQUEST, str(exc)))
            return
        self.on_request(ident, service, model, header, parsed, list(body[1:]))

    def on_request(self, ident: bytes, service: bytes, model: str, header: dict, parsed, frames: list) -> None:
        rid = parsed.rid
        if rid in self.pending:  # a client retry of something we already hold: answer once
            if parsed.ack:
                self._reply_client(ident, service, {"id": rid, "ack": True})
            return
        if rid in self.answered:
            cached = self.answered.reply(rid)
            log.info("duplicate_request", request_id=rid, resent=cached is not None)
            if cached is not None:
                self._send_client(ident, cached)
            return
        counters = self.counters.setdefault(model, ModelCounters())
        counters.requests += 1
        if self.stopping:
            self._reject(ident, service, rid, model, ErrorCode.OVERLOADED, "master is shutting down")
            return
        known = any(model in w.models for w in self.workers.values())
        if not known and not self.in_grace:
            self._reject(ident, service, rid, model, ErrorCode.UNKNOWN_MODEL, f"no worker serves model {model!r}")
            return
        if known and parsed.version is not None and not any(
            w.models.get(model, {}).get("version") == parsed.version for w in self.workers.values()
        ):
            self._reject(ident, service, rid, model, ErrorCode.UNKNOWN_VERSION,
                         f"no worker serves model {model!r} at version {parsed.version}")
            return
        if self.queues.full(model):
            self._reject(ident, service, rid, model, ErrorCode.OVERLOADED,
                         f"queue for {model!r} is full ({self.cfg.max_queue})")
            return
        now = time.monotonic()
        timeout = parsed.timeout_ms / 1000.0 if parsed.timeout_ms else self.cfg.default_timeout
        req = PendingRequest(rid, ident, service, model, parsed.version, header, frames, now + timeout, now)
        self.pending[rid] = req
        heapq.heappush(self.deadlines, (req.deadline, rid))
        self.queues.push(req)
        if parsed.ack:
            self._reply_client(ident, service, {"id": rid, "ack": True})
        self.dispatch(model)

    def on_mmi(self, ident: bytes, service: bytes, name: str, body: Sequence[zmq.Frame]) -> None:
        if name == MMI_PING:
            self._reply_client(ident, service, {"ok": True, "epoch": self.epoch})
        elif name == MMI_SERVICE:
            wanted = body[0].bytes.decode("utf-8", "replace") if body else ""
            known = any(wanted in w.models for w in self.workers.values())
            self._reply_client(ident, service, {"ok": True, "code": "200" if known else "404"})
        else:
            self._reply_client(ident, service, {"ok": False, "code": "501",
                                                "error": {"code": ErrorCode.BAD_REQUEST,
                                                          "message": f"unknown service {name!r}"}})

    def _reject(self, ident: bytes, service: bytes, rid: str, model: str, code: str, message: str) -> None:
        self.counters[model].count_error(code)
        body = [pack(error_body(rid, code, message, epoch=self.epoch))]
        self.answered.add(rid, [ident, b"", MDP_CLIENT, service, *body])
        self._send_client(ident, [ident, b"", MDP_CLIENT, service, *body])
        log.info("request_rejected", request_id=rid, model=model, code=code)

    # ------------------------------------------------------------ scheduling
    def dispatch(self, model: str) -> None:
        """Hand queued requests for `model` to workers with credit, as the policy chooses."""
        if not any(w.has_credit() and w.serves(model) for w in self.workers.values()):
            return  # the common case under load: nobody free, so do not even look at the queue
        for req in self.queues.waiting(model):
            able = [w for w in self.workers.values() if w.has_credit() and w.serves(model)]
            if not able:
                return
            cands = [w for w in able if w.serves(model, req.version)] if req.version is not None else able
            if not cands:
                continue
            loads = [Load(w.ident, len(w.in_flight), w.credit, w.weight) for w in cands]
            self.send_request(self.workers[self.policy(loads)], req)

    def send_request(self, w: WorkerRecord, req: PendingRequest) -> None:
        now = time.monotonic()
        req.attempts += 1
        req.worker = w.ident
        w.in_flight[req.rid] = req.attempts
        self.queues.remove(req)
        header = {"id": req.rid, "attempt": req.attempts, "model": req.model, "version": req.version,
                  "timeout_ms": max(0.0, (req.deadline - now) * 1000.0), "inputs": req.header["inputs"]}
        if not self._send_worker(w, [REQUEST, pack(header), *req.frames]):
            self.evict(w, "send_failed")

    # --------------------------------------------------------------- workers
    def on_worker(self, frames: Sequence[zmq.Frame]) -> None:
        ident = frames[0].bytes
        if not self._allowed(frames, "worker"):
            return
        cmd = frames[2].bytes if len(frames) >= 3 else b""
        if len(frames) < 3 or frames[1].bytes != WORKER_PROTO or cmd not in WORKER_COMMANDS:
            self._send_raw(self.backend, [ident, WORKER_PROTO, DISCONNECT,
                                          pack(error_body(None, ErrorCode.BAD_REQUEST,
                                                          "expected [RSW01][command][header...]"))])
            return
        worker = self.workers.get(ident)
        if cmd == READY:
            self.on_ready(ident, frames[3:])
            return
        if worker is None:  # not registered (we restarted, or it was evicted): ask it to register again
            if cmd != DISCONNECT:
                self._send_raw(self.backend, [ident, WORKER_PROTO, DISCONNECT, pack({"reason": "unknown worker"})])
            if cmd == REPLY and len(frames) > 3:
                self._note_late_reply(frames[3], "unknown_worker")
            return
        worker.last_seen = time.monotonic()
        try:
            if cmd == REPLY:
                self.on_reply(worker, frames[3], frames[4:])
            elif cmd == HEARTBEAT:
                self.on_heartbeat(worker, unpack_map(frames[3]) if len(frames) > 3 else {})
            elif cmd == DISCONNECT:
                self.evict(worker, "worker_disconnected")
        except ProtocolError as exc:
            log.warning("bad_worker_message", worker=worker.name, error=str(exc))

    def on_ready(self, ident: bytes, rest: Sequence[zmq.Frame]) -> None:
        try:
            info = unpack_map(rest[0]) if rest else {}
            models = info["models"]
            credit = int(info.get("credit", 1))
            if not isinstance(models, dict) or not models or credit < 1:
                raise ProtocolError("READY needs a non-empty 'models' map and credit >= 1")
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            self._send_raw(self.backend, [ident, WORKER_PROTO, DISCONNECT,
                                          pack(error_body(None, ErrorCode.BAD_REQUEST, f"bad READY: {exc}"))])
            return
        old = self.workers.get(ident)
        if old is not None:
            self.evict(old, "re_registered")
        name = str(info.get("name") or ident.hex())
        w = WorkerRecord(ident, name, models, credit, str(info.get("device", "?")), info.get("pid"),
                         weight=float(self.cfg.weights.get(name, info.get("weight", 1.0))))
        self.workers[ident] = w
        log.info("worker_registered", worker=name, models=sorted(models), credit=credit, device=w.device)
        self._send_worker(w, [HEARTBEAT, pack({"epoch": self.epoch})])
        for model in models:
            self.dispatch(model)

    def on_heartbeat(self, w: WorkerRecord, info: dict) -> None:
        models = info.get("models")
        changed = isinstance(models, dict) and models != w.models
        if changed:
            w.models = models
        if isinstance(info.get("stats"), dict):
            w.stats = info["stats"]
        if info.get("draining") and w.state != "draining":
            w.state = "draining"
            log.info("worker_draining", worker=w.name, in_flight=len(w.in_flight))
        if changed:
            for model in models:
                self.dispatch(model)

    def on_reply(self, w: WorkerRecord, header_frame: zmq.Frame, frames: Sequence[zmq.Frame]) -> None:
        header = unpack_map(header_frame)
        rid, attempt = header.get("id"), header.get("attempt")
        if w.in_flight.get(rid) == attempt:
            del w.in_flight[rid]
            w.done += 1
        req = self.pending.get(rid)
        if req is None or req.worker != w.ident or req.attempts != attempt:
            self._note_late_reply(header_frame, "not_current_attempt")
        else:
            header["worker"] = w.name
            header["epoch"] = self.epoch
            self.finish(req, [pack(header), *frames],
                        None if header.get("ok") else header.get("error", {}).get("code", ErrorCode.INTERNAL))
        for model in w.models:
            self.dispatch(model)

    def _note_late_reply(self, header_frame, why: str) -> None:
        try:
            rid = unpack_map(header_frame).get("id")
        except ProtocolError:
            rid = None
        self.late_replies += 1
        log.info("late_reply_dropped", request_id=rid, why=why)

    def evict(self, w: WorkerRecord, reason: str, tell: bool = False) -> None:
        """Forget a worker; send its in-flight requests elsewhere within their retry budget."""
        self.workers.pop(w.ident, None)
        log.warning("worker_evicted", worker=w.name, reason=reason, in_flight=len(w.in_flight))
        if tell:
            self._send_raw(self.backend, [w.ident, WORKER_PROTO, DISCONNECT, pack({"reason": reason})])
        now = time.monotonic()
        for rid in w.in_flight:
            req = self.pending.get(rid)
            if req is None or req.worker != w.ident:
                continue
            req.worker = None
            if req.attempts < self.cfg.max_attempts and now < req.deadline:
                self.counters[req.model].retries += 1
                self.queues.push(req, front=True)
            else:
                self.fail(req, ErrorCode.WORKER_LOST,
                          f"worker {w.name} lost ({reason}) after {req.attempts} attempt(s)")
        w.in_flight.clear()
        for model in {m for other in self.workers.values() for m in other.models} & set(w.models):
            self.dispatch(model)
        self._fail_orphans()

    def _fail_orphans(self) -> None:
        """Queued requests for a model no registered worker serves get their final answer now."""
        if self.in_grace:
            return
        served = {m for w in self.workers.values() for m in w.models}
        for req in list(self.pending.values()):
            if req.worker is None and req.model not in served:
                code = ErrorCode.WORKER_LOST if req.attempts else ErrorCode.UNKNOWN_MODEL
                self.fail(req, code, f"no worker serves model {req.model!r}")

    # ------------------------------------------------------------ answering
    def finish(self, req: PendingRequest, body: list, error_code: str | None) -> None:
        """The one place a request gets its final answer."""
        self.pending.pop(req.rid, None)
        self.queues.remove(req)
        counters = self.counters.setdefault(req.model, ModelCounters())
        if error_code is None:
            counters.ok += 1
        else:
            counters.count_error(error_code)
        msg = [req.client, b"", MDP_CLIENT, req.service, *body]
        self.answered.add(req.rid, msg)
        self._send_client(req.client, msg)

    def fail(self, req: PendingRequest, code: str, message: str) -> None:
        log.info("request_failed", request_id=req.rid, model=req.model, code=code, message=message)
        self.finish(req, [pack(error_body(req.rid, code, message, epoch=self.epoch))], code)

    def _expire_deadlines(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, rid = heapq.heappop(self.deadlines)
            req = self.pending.get(rid)
            if req is not None and req.deadline <= now:
                where = "queued" if req.worker is None else "in flight"
                self.fail(req, ErrorCode.TIMEOUT, f"deadline passed while {where}")

    # --------------------------------------------------------------- admin
    def on_admin(self, frames: Sequence[zmq.Frame]) -> None:
        ident = frames[0].bytes
        if not self._allowed(frames, "admin"):
            return
        envelope = [ident, b""] if len(frames) > 2 and frames[1].bytes == b"" else [ident]
        try:
            cmd = unpack_map(frames[-1]) if len(frames) > 1 else {}
            reply = self.on_admin_command(cmd)
        except ProtocolError as exc:
            reply = error_body(None, ErrorCode.BAD_REQUEST, str(exc))
        self._send_raw(self.admin, [*envelope, pack(reply)])

    def on_admin_command(self, cmd: dict) -> dict:
        name = cmd.get("cmd")
        if name == "status":
            return {"ok": True, **build_status(self, time.monotonic())}
        if name == "drain":
            target = cmd.get("worker")
            matched = [w for w in self.workers.values() if target in (w.name, w.ident.hex())]
            for w in matched:
                w.state = "draining"
                self._send_worker(w, [DRAIN, pack({"reason": "admin"})])
                log.info("worker_draining", worker=w.name, in_flight=len(w.in_flight))
            if not matched:
                return error_body(None, ErrorCode.BAD_REQUEST, f"no worker named {target!r}")
            return {"ok": True, "draining": [w.name for w in matched]}
        return error_body(None, ErrorCode.BAD_REQUEST, f"unknown admin command {name!r}; try status or drain")

    # ------------------------------------------------------------ security
    def _allowed(self, frames: Sequence[zmq.Frame], role: str) -> bool:
        """With keys: the sender's key is (still) a `role` key. A refused peer gets nothing."""
        if self.cfg.security.authorize(frames[-1], {role}) is not None:
            return True
        self.refused += 1
        log.warning("message_refused", socket=role, user=user_id(frames[-1]))
        return False

    def _within_rate(self, ident: bytes, frames: Sequence[zmq.Frame]) -> bool:
        """Token bucket per client key (per connection without keys); over it: OVERLOADED + retry_after_s."""
        if self.limiter is None or len(frames) < 4 or frames[3].bytes.startswith(b"mmi."):
            return True
        key = user_id(frames[-1]) or ident
        wait = self.limiter.take(key, time.monotonic())
        if wait <= 0:
            return True
        try:
            rid = unpack_map(frames[4]).get("id") if len(frames) > 4 else None
        except ProtocolError:
            rid = None
        rid = rid if isinstance(rid, str) else None
        self._reply_client(ident, frames[3].bytes, error_body(
            rid, ErrorCode.OVERLOADED, f"rate limit: over {self.cfg.rate_limit:g} requests/s for this client",
            retry_after_s=round(wait, 3)))
        log.info("rate_limited", request_id=rid, retry_after_s=round(wait, 3))
        return False

    # --------------------------------------------------------------- sends
    def _reply_client(self, ident: bytes, service: bytes, body: dict) -> None:
        body.setdefault("epoch", self.epoch)
        self._send_client(ident, [ident, b"", MDP_CLIENT, service, pack(body)])

    def _send_client(self, ident: bytes, msg: list) -> None:
        if not self._send_raw(self.frontend, msg):
            log.warning("reply_undeliverable", client=ident.hex())

    def _send_worker(self, w: WorkerRecord, parts: list) -> bool:
        return self._send_raw(self.backend, [w.ident, WORKER_PROTO, *parts])

    @staticmethod
    def _send_raw(sock: zmq.Socket, msg: list) -> bool:
        """Send without blocking; False when the peer is gone or at its high-water mark."""
        try:
            sock.send_multipart(msg, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                return False
            raise


def serve(cfg: BrokerConfig, announce=None) -> None:
    """Bind, announce the endpoints (for launchers and tests), and run until stopped."""
    broker = Broker(cfg)
    broker.install_signal_handlers()
    if announce is not None:
        announce({"role": "master", "pid": os.getpid(), "epoch": broker.epoch, **broker.endpoints})
    broker.run()
