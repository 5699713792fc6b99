"""The master's event loop: three ROUTER sockets, one zmq.Poller, no thread per request.

Methods are named after protocol events (Majordomo style): ``on_client``, ``on_worker``,
``on_admin``, ``on_reply``, ``on_ready``, ``on_heartbeat``. Decisions live elsewhere:
which worker gets a request is ``scheduler``'s, who is dead is ``liveness``'s. This loop only
moves frames and keeps the books so that every request gets exactly one final answer.

Nothing a peer sends is trusted: worker and client headers go through the parsers in
``protocol.envelope`` (clean typed values or ProtocolError) before they touch the books, and a
handler that raises anyway is logged, its peer answered (a client) or disconnected (a worker),
and the loop goes on. With --keys each socket admits only its own role, re-checked per message
(``_allowed``; rules in protocol/security.py), and ``_within_rate`` applies the per-client
token bucket.
"""
from __future__ import annotations

import errno
import gc
import heapq
import itertools
import os
import signal
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import structlog
import zmq

from ringserve.master import autoscale, liveness
from ringserve.master.cache import ResponseCache, input_digest
from ringserve.master import peers as peering
from ringserve.master import routing
from ringserve.master.metrics import MasterMetrics
from ringserve.master.ratelimit import RateLimiter
from ringserve.master.registry import AnsweredCache, ModelCounters, ModelQueues, PendingRequest, WorkerRecord
from ringserve.master.scheduler import Load, make_policy
from ringserve.master.status import build_status
from ringserve.master.window import Windows
from ringserve.protocol.codec import pack, pack_map_head, pack_pairs, short_repr, unpack_map
from ringserve.protocol.envelope import (
    FRAMING, MAX_NAME_LEN, REPLY_FIELDS, answers_frames, bounded_chunks, checked_result, dispatch_chunks, dispatch_frames,
    dispatch_frames_packed, dispatch_one_packed, is_model_name, parse_heartbeat, parse_ready, parse_request_header, parse_worker_reply,
    raw_bytes, split_batch, split_batch_checked, split_results,
)
from ringserve.protocol.security import Security, user_id
from ringserve.protocol.sockets import BindError, bind, drain, frames_nbytes, send_frames
from ringserve.protocol.messages import (
    DISCONNECT, DRAIN, HEARTBEAT, MDP_CLIENT, MMI_BATCH, MMI_BATCH_PACKED, MMI_FOUND, MMI_NOT_FOUND,
    MMI_NOT_IMPLEMENTED, MMI_PING, MMI_SERVICE, READY, REPLY, REQUEST, WORKER_COMMANDS, WORKER_PROTO, ErrorCode, ProtocolError, error_body,
)

log = structlog.get_logger("ringserve.master")

MAX_BATCH_RECV = 256  # messages read from one socket per loop turn, so no socket starves the others
MAX_BATCH_CLIENTS = 65536  # routing ids remembered as batching clients (oldest forgotten: they get singles)
MAX_UNDELIVERED = 65536  # (routing id, request id) of batched answers ZeroMQ refused, remembered (oldest forgotten)
MMI_BATCH_BYTES = MMI_BATCH.encode()
MMI_BATCH_PACKED_BYTES = MMI_BATCH_PACKED.encode()
MAX_UNKNOWN_WAITING = 64  # during the start-up grace: model names nobody serves yet that may queue
UNSERVED_LABEL = "_unserved"  # metrics label for names no worker serves
_ROLE_SETS = {role: frozenset([role]) for role in ("client", "worker", "admin")}
_ADMIN_ROLES = frozenset(["admin", "master"])  # peer masters sync over the admin socket
METRICS_REFRESH_S = 0.25  # gauges (queue depth, in flight) are set from the books this often
GC_YOUNG_THRESHOLD = 10_000  # the cyclic GC's generation-0 threshold once serving (Python's default: 700)


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
    answer_cache_bytes: int = 64 << 20  # reply bytes kept to answer retried ids again
    max_timeout: float = 300.0  # a client's timeout_ms is capped to this many seconds
    state_dir: str | None = None  # where routes are kept across restarts (none: routes live in memory)
    security: Security = field(default_factory=Security)  # keys, MAXMSGSIZE (protocol/security.py)
    rate_limit: float = 0.0  # requests per second per client (0: no limit)
    rate_burst: float | None = None
    client_batch_max: int = 256  # answers in one message to a client that batches
    client_batch_bytes: int = 4 << 20  # bytes of answers in one such message (a larger answer goes alone)
    unavailable_grace: float = 10.0  # a model served this recently queues while no worker serves it
    response_cache_bytes: int = 64 << 20  # answers of models marked cache=true (master/cache.py)
    peers: list[str] = field(default_factory=list)  # the other active masters' admin endpoints
    peer_interval: float = 0.25  # how often masters exchange what they share (routes) and see each other
    autoscale_policy: autoscale.AutoscalePolicy = field(default_factory=autoscale.AutoscalePolicy)  # desired_workers


def _router(ctx: zmq.Context, endpoint: str, hwm: int, sec: Security, domain: str) -> tuple[zmq.Socket, str]:
    sock = ctx.socket(zmq.ROUTER)
    sec.server(sock, domain)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown peer raises instead of dropping silently
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    try:
        return sock, bind(sock, endpoint)
    except BindError:
        sock.close(linger=0)
        raise


class Broker:
    def __init__(self, cfg: BrokerConfig, ctx: zmq.Context | None = None):
        self.cfg = cfg
        self.ctx = ctx or zmq.Context()
        self.epoch = uuid.uuid4().hex[:12]
        self.policy = make_policy(cfg.policy, cfg.seed)
        self.workers: dict[bytes, WorkerRecord] = {}
        self.pending: dict[str, PendingRequest] = {}  # the master's key -> request
        self.held: dict[tuple[str, str], str] = {}  # (client scope, client id) -> key of the pending request
        self._keys = itertools.count(1)
        self.recently_served: dict[str, float] = {}  # model nobody serves now -> when its last worker left
        self.queues = ModelQueues(cfg.max_queue)
        self.answered = AnsweredCache(max_bytes=cfg.answer_cache_bytes)
        self._answered_ids = self.answered.ids  # the same dict for the cache's life: membership per request
        self.responses = ResponseCache(cfg.response_cache_bytes)
        self._batch_hits: dict[tuple[str, int], int] | None = None  # while on_batch runs: its cache hits per
        # (model, version), their answer metrics observed once at the message's end (_count_batch_hits)
        self.counters: dict[str, ModelCounters] = {}  # only for models some worker serves or served
        self.windows = Windows()  # recent rate and latency per counted model (status)
        self.unknown_model_requests = 0  # requests for names nobody serves: one number, not one entry each
        self.deadlines: list[tuple[float, str]] = []  # lazy: answered entries are skipped, compacted in finish
        self.late_replies = 0
        self.bad_worker_messages = 0
        self.metrics = MasterMetrics(cfg.policy)
        self._served_cache: set[str] | None = None  # models some worker announces (see _served_models)
        self._cacheable: dict[str, int | None] | None = None  # see _cache_versions
        self._dirty: set[str] = set()  # models to dispatch at the end of this loop turn
        self._outgoing: dict[bytes, tuple[WorkerRecord, list[PendingRequest]]] = {}  # assigned, not yet sent
        self._batch_clients: OrderedDict[bytes, bool] = OrderedDict()  # routing ids that sent a batch (LRU): packed?
        self._client_out: dict[bytes, list] = {}  # their answers of this turn [(header, frames)], see _flush_clients
        # (routing id, request id) of batched answers whose send failed at the turn's end, after `answered`
        # booked them as delivered to that socket: a resend from it gets the answer again, not an ACK alone
        self._undelivered: OrderedDict[tuple[bytes, str], None] = OrderedDict()
        if cfg.state_dir:
            os.makedirs(cfg.state_dir, exist_ok=True)
        self.routes: dict[str, routing.Route] = routing.load_routes(self._routes_path()) if cfg.state_dir else {}
        self.routes_clock: peering.Clock = (0, self.epoch)  # see master/peers.py: the newest table wins
        self.metrics_refreshed = 0.0
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
        self._secure = cfg.security.enabled  # keys: every message's sender is checked (_allowed)
        self.frontend, self.frontend_ep = _router(self.ctx, cfg.frontend, cfg.hwm, cfg.security, "master.client")
        self.backend, self.backend_ep = _router(self.ctx, cfg.backend, cfg.hwm, cfg.security, "master.worker")
        self.admin, self.admin_ep = _router(self.ctx, cfg.admin, 1000, cfg.security, "master.admin")
        self.poller = zmq.Poller()
        for sock in (self.frontend, self.backend, self.admin):
            self.poller.register(sock, zmq.POLLIN)
        self.peers = {ep: peering.PeerState(ep) for ep in cfg.peers}
        self.peer_socks: dict[zmq.Socket, peering.PeerState] = {}
        for ep in cfg.peers:
            sock = self.ctx.socket(zmq.DEALER)
            cfg.security.client(sock, "master")  # an active-active set shares the master key
            for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 4), (zmq.RCVHWM, 64), (zmq.IMMEDIATE, 1),
                               (zmq.RECONNECT_IVL, 100), (zmq.RECONNECT_IVL_MAX, 1000)):
                sock.setsockopt(opt, value)
            sock.connect(ep)
            self.poller.register(sock, zmq.POLLIN)
            self.peer_socks[sock] = self.peers[ep]
        self.last_peer_sync = 0.0
        self._next_liveness = 0.0  # when the next worker could have been silent too long (_check_liveness)

    @property
    def endpoints(self) -> dict[str, str]:
        return {"frontend": self.frontend_ep, "backend": self.backend_ep, "admin": self.admin_ep}

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        log.info("master_started", epoch=self.epoch, policy=self.cfg.policy, **self.endpoints)
        try:
            while not self._finished():
                self.turn()
        finally:
            self.close()

    def turn(self, timeout_ms: int | None = None) -> None:
        """One loop turn: read what arrived, run the timers, then dispatch and send what the
        handlers queued (each worker gets its share of the turn's requests in one message).
        `timeout_ms`: how long the poll may wait at most; None: until the next timer is due."""
        events = dict(self.poller.poll(self._poll_timeout_ms() if timeout_ms is None else timeout_ms))
        if events:
            for sock, handler in ((self.backend, self.on_worker), (self.frontend, self.on_client),
                                  (self.admin, self.on_admin)):
                if sock in events:
                    drain(sock, handler, MAX_BATCH_RECV)
            for sock, peer in self.peer_socks.items():
                if sock in events:
                    drain(sock, lambda frames, peer=peer: self.on_peer_reply(peer, frames), MAX_BATCH_RECV)
        try:
            self.on_tick(time.monotonic())
        except Exception:  # a bug must not end the loop; the next turn tries again
            log.exception("tick_failed")
        if self._dirty or self._outgoing:
            try:
                self.flush()
            except Exception:
                log.exception("flush_failed")
        if self._client_out:
            try:
                self._flush_clients()
            except Exception:
                log.exception("client_flush_failed")

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
        for sock in (self.frontend, self.backend, self.admin, *self.peer_socks):
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
            self._flush_clients()
            return True
        return False

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        nxt = min(self.last_heartbeat + self.cfg.heartbeat_interval,
                  self._next_liveness)  # the earliest possible eviction, not just the next heartbeat
        if self.deadlines:
            nxt = min(nxt, self.deadlines[0][0])
        if self.peers:
            nxt = min(nxt, self.last_peer_sync + self.cfg.peer_interval)
        return max(0, min(int((nxt - now) * 1000) + 1, 1000))

    def on_tick(self, now: float) -> None:
        """The timers, every turn: each does nothing until it is due (one comparison each)."""
        deadlines = self.deadlines
        if deadlines and deadlines[0][0] <= now:
            self._expire_deadlines(now)
        if self.recently_served:
            self._expire_unavailable(now)
        if self._secure:
            self._cut_revoked()
        if self.peers and now - self.last_peer_sync >= self.cfg.peer_interval:
            self.last_peer_sync = now
            self._sync_peers(now)
        if now - self.metrics_refreshed >= METRICS_REFRESH_S:
            self.metrics_refreshed = now
            self._refresh_metrics()
        if self.in_grace and now >= self.grace_until:
            self.in_grace = False
            self._fail_orphans()
        if liveness.heartbeat_due(self.last_heartbeat, now, self.cfg.heartbeat_interval):
            self.last_heartbeat = now
            beat = pack({"epoch": self.epoch, "framing": FRAMING})
            for w in list(self.workers.values()):
                self._send_worker(w, [HEARTBEAT, beat])
        if now >= self._next_liveness:
            self._check_liveness(now)

    def _check_liveness(self, now: float) -> None:
        """Evict the workers silent for liveness x interval, and note when the next one could be:
        a worker's last_seen only moves forward and one registering later is seen at or after
        `now`, so no eviction can fall due before that time and the check waits for it."""
        interval, beats = self.cfg.heartbeat_interval, self.cfg.heartbeat_liveness
        seen = {ident: w.last_seen for ident, w in self.workers.items()}
        for ident in liveness.missed(seen, now, interval, beats):
            w = self.workers.get(ident)
            if w is not None:
                self.evict(w, "heartbeat_expired", tell=True)
        first = min((w.last_seen for w in self.workers.values()), default=now)
        self._next_liveness = min(first, now) + liveness.expiry(interval, beats)

    # --------------------------------------------------------------- clients
    def on_client(self, frames: Sequence[zmq.Frame]) -> None:
        ident = frames[0].bytes
        if self._secure and not self._allowed(frames, "client"):  # without keys everyone is allowed
            return
        try:
            self._on_client(ident, frames)
        except Exception:
            log.exception("client_handler_failed", client=ident.hex())
            self._reply_client(ident, frames[3].bytes if len(frames) > 3 else b"",
                               error_body(None, ErrorCode.INTERNAL, "the master could not handle this message"))

    def _on_client(self, ident: bytes, frames: Sequence[zmq.Frame]) -> None:
        if len(frames) < 4 or frames[1].bytes != b"" or frames[2].bytes != MDP_CLIENT:
            self._reply_client(ident, b"", error_body(None, ErrorCode.BAD_REQUEST,
                               "expected [empty][MDPC01][service][body...] (ZeroMQ RFC 7)"))
            return
        service, body = frames[3].bytes, frames[4:]
        if service == MMI_BATCH_BYTES or service == MMI_BATCH_PACKED_BYTES:
            self.on_batch(ident, frames, packed=service == MMI_BATCH_PACKED_BYTES)
            return
        self._one_request(ident, client_scope(frames[-1], self._secure), service, body)

    def on_batch(self, ident: bytes, frames: Sequence[zmq.Frame], packed: bool = False) -> None:
        """Several requests in one message (a ringserve client's coalesced sends): each is handled as
        if it came alone (its own checks, dedupe, rate limit, answer), and this client's answers of the
        turn go back together (_flush_clients), packed ("mmi.batch2") if the client sent them packed.
        A break in the framing fails what follows it only."""
        self._batch_clients[ident] = packed
        self._batch_clients.move_to_end(ident)
        while len(self._batch_clients) > MAX_BATCH_CLIENTS:
            self._batch_clients.popitem(last=False)
        scope = client_scope(frames[-1], self._secure)
        if packed:
            requests, broken = split_batch_checked(frames[4:])
        else:
            requests, broken = split_batch(frames[4:])
            requests = [(*r, None) for r in requests]
        now = time.monotonic()  # one clock read for the message: its requests arrived together
        self._batch_hits = {}
        try:
            self._batch_requests(ident, scope, requests, now)
        finally:
            self._count_batch_hits(now)
        if broken is not None:
            self._reply_client(ident, MMI_BATCH_PACKED_BYTES if packed else MMI_BATCH_BYTES,
                               error_body(None, ErrorCode.BAD_REQUEST, f"batch: {broken}"))

    def _batch_requests(self, ident: bytes, scope: str, requests: list, now: float) -> None:
        """on_batch's requests, each as if it came alone."""
        facts: dict[str, tuple] = {}  # model -> _model_facts(model): they cannot change within one message
        for svc, header_frame, header, tensors, parsed in requests:
            known = facts.get(svc)  # a name with facts was checked already
            if known is None and not is_model_name(svc):
                self._one_request(ident, scope, svc.encode(), [header_frame, *tensors], header)  # says what is wrong
                continue
            if parsed is None:
                try:  # what _one_request does, without decoding the name or slicing the frames again
                    parsed = parse_request_header(header, tensors)
                except ProtocolError as exc:
                    rid = header.get("id") if isinstance(header.get("id"), str) else None
                    self._reply_client(ident, svc.encode(), error_body(rid, ErrorCode.BAD_REQUEST, str(exc)))
                    continue
            if known is None:
                known = facts[svc] = self._model_facts(svc)
            self.on_request(ident, scope, known[4], svc, header_frame, parsed, tensors, now, known)

    def _count_batch_hits(self, now: float) -> None:
        """The answer metrics of a message's cache hits, one update per (model, version): each hit's
        duration is the message's (arrival to the end of its handling), the same bucket in practice."""
        hits, self._batch_hits = self._batch_hits, None
        if hits:
            took = time.monotonic() - now
            for (model, version), n in hits.items():
                self.metrics.on_answers(model, version, "ok", [took] * n)

    def _one_request(self, ident: bytes, scope: str, service: bytes, body: Sequence, header: dict | None = None) -> None:
        """One request (alone, or one of a batch whose split already unpacked its header)."""
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
            if not is_model_name(model):  # not "mmi." (dispatched above): 1..MAX_NAME_LEN characters
                raise ProtocolError(f"service name must be 1..{MAX_NAME_LEN} characters")
            if not body:
                raise ProtocolError("missing request body")
            if header is None:
                header = unpack_map(body[0])
            rid = header.get("id") if isinstance(header.get("id"), str) else None
            parsed = parse_request_header(header, body[1:])
        except ProtocolError as exc:
            self._reply_client(ident, service, error_body(rid, ErrorCode.BAD_REQUEST, str(exc)))
            return
        self.on_request(ident, scope, service, model, body[0], parsed, list(body[1:]))

    def _model_facts(self, model: str) -> tuple:
        """What admitting a request needs to know of its model, the same for every request of a
        message (nothing on_request does changes them): (counters or None, whether a worker serves
        it, its route or None, whether it is cacheable, its name as bytes)."""
        counters = self.counters.get(model) or self._counters(model)
        served = self._served_cache if self._served_cache is not None else self._served_models()
        cacheable = self._cacheable if self._cacheable is not None else self._cache_versions()
        return (counters, counters is not None and model in served, self.routes.get(model),
                self.cfg.response_cache_bytes > 0 and model in cacheable, model.encode())

    def on_request(self, ident: bytes, scope: str, service: bytes, model: str, header_frame, parsed,
                   frames: list, now: float | None = None, facts: tuple | None = None) -> None:
        """A checked request. Its id is the client's within `scope`: a resend of an id the master
        holds or has answered is never run twice, never rate-limited, and answered only for the
        model it first asked; the same id from another scope is another request. `facts` are
        `_model_facts(model)` when the caller has them (a batch: once per model and message)."""
        rid = parsed.rid
        cid = (scope, rid)
        key = self.held.get(cid)
        if key is not None:  # a client retry of something we already hold: run once, answer whoever asked last
            held = self.pending[key]
            if held.model != model:
                self._reply_client(ident, service, _id_in_use(rid, held.model))
                return
            if held.client != ident:
                log.info("request_new_route", request_id=rid)
                held.client = ident
            if parsed.ack:
                self._reply_client(ident, service, {"id": rid, "ack": True})
            return
        if cid in self._answered_ids:  # `cid in self.answered`, without a method call per request
            self._answer_again(ident, cid, service, model, parsed.ack)
            return
        if self.limiter is not None and not self._within_rate(ident, scope, service, rid):
            return
        counters, known, route, cacheable, _ = self._model_facts(model) if facts is None else facts
        if counters is not None:
            counters.requests += 1
        else:
            self.unknown_model_requests += 1
        if self.stopping:
            self._reject(ident, cid, service, model, ErrorCode.OVERLOADED, "master is shutting down")
            return
        if not known and not self._may_wait(model):
            self._reject(ident, cid, service, model, ErrorCode.UNKNOWN_MODEL,
                         f"no worker serves model {short_repr(model)}")
            return
        pin = parsed.version
        if known and pin is not None and pin not in self._served_versions(model):
            self._reject(ident, cid, service, model, ErrorCode.UNKNOWN_VERSION,
                         f"no worker serves model {model!r} at version {pin}")
            return
        if pin is not None:
            route = None  # a pinned version wins
        version = self._routed_version(route, parsed.tags) if route else pin
        now = time.monotonic() if now is None else now
        digest = None
        if cacheable:  # a hit is answered before anything a miss needs: the queue's room, a deadline, books
            # the digest of the inputs, once on arrival: the lookup key now, the store key when it answers
            digest = input_digest(parsed.inputs, frames)
            cache_key = self._cache_key(model, version, digest)
            if cache_key is not None and self._answer_from_cache(ident, cid, service, model, cache_key, counters,
                                                                 now):
                return
        timeout = self.cfg.default_timeout if parsed.timeout_ms is None else parsed.timeout_ms / 1000.0
        timeout = min(timeout, self.cfg.max_timeout)  # the client chooses, within the master's cap
        key = "%x" % next(self._keys)  # _new_key() (a refused request uses a key too: keys only need be unique)
        req = PendingRequest(key, rid, ident, service, model, version, header_frame, frames, now + timeout, now, 0,
                             None, 0, scope, pin is not None, parsed.tags, counters is not None, digest)
        if not self.queues.push_new(req, pin):  # queues.full(model, pin), else queues.push(req): one call
            self._reject(ident, cid, service, model, ErrorCode.OVERLOADED,
                         f"queue for {model!r} is full ({self.cfg.max_queue} requests, "
                         f"{self.queues.max_pins} version pins)")
            return
        self.pending[key] = req  # _hold(req)
        heapq.heappush(self.deadlines, (req.deadline, key))
        self.held[cid] = key
        if parsed.ack:
            self._reply_client(ident, service, {"id": rid, "ack": True})
        if route is not None and route.shadow is not None and route.shadow != version:
            self._mirror(req, route.shadow)
        self._dirty.add(model)  # dispatch(model)

    # ------------------------------------------------------------ response cache
    def _cache_key(self, model: str, version: int | None, digest: bytes | None):
        """(model, the version that would serve it, digest of the inputs), or None: the model is not
        cacheable, or (unpinned, no route) its workers do not agree on one current version (a
        rollout), so which version would answer is not known."""
        if digest is None:
            return None
        if version is None:
            cacheable = self._cacheable if self._cacheable is not None else self._cache_versions()
            version = cacheable.get(model)
        return None if version is None else (model, version, digest)

    def _answer_from_cache(self, ident: bytes, cid: tuple[str, str], service: bytes, model: str, key, counters,
                           now: float) -> bool:
        hit = self.responses.lookup(key)
        self.metrics.on_cache(model, hit is not None)
        if hit is None:
            return False
        _, frames, _, (head, pairs, nbytes) = hit  # the header with this epoch and "cached", packed once:
        header = head + pack(cid[1]) + pairs  # the hit packs only its id (pack_map_head)
        body = [header, *frames]
        counters.ok += 1
        hits = self._batch_hits
        if hits is None:  # a request alone
            self.metrics.on_answer(model, key[1], "ok", time.monotonic() - now)
        else:  # one of a batch: counted with the message's other hits when it ends
            k = (model, key[1])
            hits[k] = hits.get(k, 0) + 1
        sent = self._send_client(ident, service, body)
        self.answered.add(cid, model, (service, *body), ident if sent else None,
                          len(service) + len(header) + nbytes)
        return True

    def _cache_result(self, req: PendingRequest, body: list, version: int | None) -> None:
        """Keep a result of a cacheable model under the version that produced it (not a shadow's), by
        the digest taken when the request arrived."""
        if req.client is None or req.digest is None or version is None or req.model not in self._cache_versions():
            return
        try:
            header = unpack_map(body[0])
        except ProtocolError:
            return
        header = {k: v for k, v in header.items() if k not in ("id", "key", "epoch", "attempt")}
        count, pairs = pack_pairs({**header, "epoch": self.epoch, "cached": True})  # a hit adds only its id
        frames = list(body[1:])
        self.responses.put((req.model, version, req.digest), header, frames,
                           (pack_map_head(count, "id"), pairs, frames_nbytes(frames)))

    def _answer_again(self, ident: bytes, cid: tuple[str, str], service: bytes, model: str, ack: bool) -> None:
        """An id this scope already had answered: its answer again (only for the same model), or an ACK
        alone on the socket the answer last went to (ZeroMQ delivers in order: it is there already)."""
        rid = cid[1]
        if self.answered.model(cid) != model:
            self._reply_client(ident, service, _id_in_use(rid, self.answered.model(cid)))
            return
        if ack and self.answered.delivered_to(cid) == ident and (ident, rid) not in self._undelivered:
            self._reply_client(ident, service, {"id": rid, "ack": True})
            return
        self._undelivered.pop((ident, rid), None)  # sent again now (a refusal at this turn's end books it again)
        cached = self.answered.reply(cid)
        log.info("duplicate_request", request_id=rid, resent=cached is not None)
        if cached is not None:
            if self._send_client(ident, cached[0], cached[1:]):
                self.answered.resent_to(cid, ident)
        else:  # remembered as answered, but the reply itself is no longer held: say so, never run twice
            self._reply_client(ident, service, error_body(
                rid, ErrorCode.BAD_REQUEST, "this id was already answered and the answer is no longer "
                "held; send the request again under a new id"))

    def _new_key(self) -> str:
        """The master's own name for a request: unique for the life of this process, never reused,
        so a late reply can never be taken for another request's answer."""
        return "%x" % next(self._keys)

    def _hold(self, req: PendingRequest) -> None:
        self.pending[req.key] = req
        heapq.heappush(self.deadlines, (req.deadline, req.key))
        self.queues.push(req)

    def _may_wait(self, model: str) -> bool:
        """A request for a model no worker serves right now may queue: during the start-up grace
        (its workers are re-registering; at most MAX_UNKNOWN_WAITING names), or while the model is
        unavailable, not unknown (its last worker left within --unavailable-grace)."""
        if model in self.recently_served:
            return True
        return self.in_grace and (self.queues.depth(model) > 0 or self._unknown_waiting() < MAX_UNKNOWN_WAITING)

    def _models_changed(self) -> None:
        """What workers announce changed (registration, heartbeat, eviction): drop the derived views."""
        self._served_cache = None
        self._cacheable = None

    def _cache_versions(self) -> dict[str, int | None]:
        """Models every serving worker marks cache=true -> the one current version they all serve
        (None while they disagree: a rollout). Rebuilt only when the announcements change."""
        if self._cacheable is None:
            view: dict[str, set] = {}
            spoilt: set[str] = set()
            for w in self.workers.values():
                for m, info in w.models.items():
                    if not info.get("ready", True):
                        continue
                    if not info.get("cache"):
                        spoilt.add(m)
                    view.setdefault(m, set()).add(info.get("version"))
            self._cacheable = {m: (next(iter(v)) if len(v) == 1 else None) for m, v in view.items() if m not in spoilt}
        return self._cacheable

    def _served(self, model: str) -> bool:
        return model in self._served_models()

    def _served_models(self) -> set[str]:
        """Every model some registered worker announces (cached: the books change far less often
        than requests arrive; on_ready, on_heartbeat and evict clear it)."""
        if self._served_cache is None:
            self._served_cache = {m for w in self.workers.values() for m in w.models}
        return self._served_cache

    def _counters(self, model: str) -> ModelCounters | None:
        """Counters of a model some worker serves (or served); None for any other name a client asks."""
        c = self.counters.get(model)
        if c is None and self._served(model):
            c = self.counters[model] = ModelCounters()
        return c

    def _unknown_waiting(self) -> int:
        """Model names with queued requests that no worker serves (only during the start-up grace)."""
        served = self._served_models()
        return sum(1 for m in self.queues.models() if m not in served)

    def _routed_version(self, route: routing.Route, tags) -> int | None:
        """The route's choice; None (any version) when no worker serves the chosen one right now."""
        version = routing.choose(route, routing.sticky_value(route, tags))
        return version if version in self._served_versions(route.model) else None

    def _served_versions(self, model: str) -> set[int]:
        return set().union(*(w.versions(model) for w in self.workers.values()))

    def _mirror(self, req: PendingRequest, version: int) -> None:
        """A shadow copy: same inputs, pinned to `version`, answered to nobody (counted in metrics).
        It has a key of its own and no client id, so it is never confused with the request it copies."""
        if self.queues.full(req.model, version) or version not in self._served_versions(req.model):
            self.metrics.on_shadow(req.model, version, "dropped")
            return
        self._hold(PendingRequest(self._new_key(), req.rid, None, req.service, req.model, version, req.header,
                                  req.frames, req.deadline, req.received, scope=req.scope, pinned=True))

    def _model_label(self, model: str) -> str:
        """A metrics label: the model's name when a worker serves it, so client input cannot grow the books."""
        return model if self._served(model) else UNSERVED_LABEL

    def on_mmi(self, ident: bytes, service: bytes, name: str, body: Sequence[zmq.Frame]) -> None:
        """ZeroMQ RFC 8: mmi.service answers one plain frame, "200" or "404"; unknown mmi.* "501"."""
        if name == MMI_PING:
            self._reply_client(ident, service, {"ok": True, "epoch": self.epoch})
            return
        if name == MMI_SERVICE:
            wanted = body[0].bytes.decode("utf-8", "replace") if body else ""
            code = MMI_FOUND if self._served(wanted) else MMI_NOT_FOUND
        else:
            code = MMI_NOT_IMPLEMENTED
        self._send_raw(self.frontend, [ident, b"", MDP_CLIENT, service, code])  # a plain frame: never in a batch

    def _reject(self, ident: bytes, cid: tuple[str, str], service: bytes, model: str, code: str,
                message: str) -> None:
        counters = self._counters(model)
        if counters is not None:
            counters.count_error(code)
        self.metrics.on_answer(self._model_label(model), None, code, 0.0)
        body = [pack(error_body(cid[1], code, message, epoch=self.epoch))]
        sent = self._send_client(ident, service, body)
        if code not in ErrorCode.RETRYABLE:  # a retry under the same id may succeed later
            self.answered.add(cid, model, [service, *body], ident if sent else None)
        log.info("request_rejected", request_id=cid[1], model=model[:MAX_NAME_LEN], code=code)

    # ------------------------------------------------------------ scheduling
    def dispatch(self, model: str) -> None:
        """Ask for queued requests of `model` to be handed out at the end of this loop turn (flush)."""
        self._dirty.add(model)

    def flush(self) -> None:
        """Hand queued requests to workers with credit, as the policy chooses, then send each
        worker its requests of this turn in one REQUEST message.

        A failed send evicts its worker, and the eviction asks to dispatch again: those requests
        join the next round here, never a nested dispatch; each extra round follows an
        eviction, so the rounds are bounded by the number of workers. A send that raises (a bug)
        answers its requests INTERNAL and the turn's other sends still go (`_fail_unsent`).
        """
        for _ in range(len(self.workers) + 2):
            if not self._dirty and not self._outgoing:
                return
            while self._dirty:
                self._dispatch_model(self._dirty.pop())
            outgoing, self._outgoing = self._outgoing, {}
            for w, reqs in outgoing.values():
                try:
                    self._send_requests(w, reqs)
                except Exception:  # a bug packing these: each answered now, not left assigned until its deadline
                    log.exception("send_requests_failed", worker=w.name, requests=len(reqs))
                    self._fail_unsent(w, reqs)

    def _fail_unsent(self, w: WorkerRecord, reqs: list[PendingRequest]) -> None:
        """Answer INTERNAL every request of `reqs` still assigned to `w` (its slot given back by
        `finish`): whatever made their send raise would make it raise again on another worker, so
        they are not requeued; the other workers' requests of the turn are still sent."""
        for r in reqs:
            if r.worker == w.ident and self.pending.get(r.key) is r:
                self.fail(r, ErrorCode.INTERNAL, "the master could not send this request to a worker")

    def _dispatch_model(self, model: str) -> None:
        """Each send looks at the workers once and at the head of each version pin's FIFO, never
        the whole queue; the free workers are recomputed before every send, so an eviction in
        the middle (a failed send) cannot leave a stale view that sends beyond credit."""
        now = time.monotonic()
        # Which workers serve the model cannot change during this call (nothing here sends, so nothing
        # evicts); which of them have credit is looked at again before every assignment.
        serving = [w for w in self.workers.values() if w.serves(model)]
        for _ in range(len(self.workers) + sum(w.credit for w in self.workers.values()) + 1):
            able = [w for w in serving if w.has_credit()] if serving else self._loaders(model)
            #                                      nobody holds it: a worker that loads it on demand
            if not able:
                return  # the common case under load: nobody free, so do not even look at the queue
            heads = self.queues.heads(model)
            if len(able) == 1 and len(heads) == 1:  # one free worker, one FIFO: hand it a run at once
                w, pin = able[0], heads[0][0]
                if pin is not None and not w.serves(model, pin):
                    return
                self.policy([Load(w.ident, len(w.in_flight), w.credit, w.weight)])  # what it sees (round-robin)
                self._assign_run(w, model, pin, now)
                continue
            best: tuple[PendingRequest, list[WorkerRecord]] | None = None
            for pin, req in heads:
                if best is not None and req.seq >= best[0].seq:
                    continue
                cands = able if pin is None else [w for w in able if w.serves(model, pin)]
                if cands:
                    best = (req, cands)
            if best is None:
                return
            req, cands = best
            key = self.policy([Load(w.ident, len(w.in_flight), w.credit, w.weight) for w in cands])
            target = cands[0]
            if len(cands) > 1:
                target = next((w for w in cands if w.ident == key), target)
            self.assign(target, req, now)

    def _assign_run(self, w: WorkerRecord, model: str, pin: int | None, now: float) -> None:
        """`assign` for the oldest requests of one FIFO, as many as `w` has credit for (the same
        assignments one at a time would make: each takes the FIFO's head while `w` is the one free
        worker). `w` is registered and has credit: `_dispatch_model` just found it so, and nothing
        between sends or evicts."""
        reqs = self.queues.pop_front(model, pin, w.credit - len(w.in_flight))
        ident, in_flight = w.ident, w.in_flight
        for req in reqs:
            req.attempts += 1
            req.worker = ident
            in_flight[req.key] = req.attempts
        self.metrics.on_dispatches(model, [now - req.received for req in reqs])
        entry = self._outgoing.get(ident)
        if entry is None:
            entry = self._outgoing[ident] = (w, [])
        entry[1].extend(reqs)

    def _loaders(self, model: str) -> list[WorkerRecord]:
        """Workers with credit that load `model` on demand, those with room first (no eviction)."""
        loaders = [w for w in self.workers.values() if w.has_credit() and w.can_load(model)]
        return [w for w in loaders if w.has_room()] or loaders

    def assign(self, w: WorkerRecord, req: PendingRequest, now: float | None = None) -> bool:
        """One attempt of `req` on `w`, sent at the end of the turn; refused unless the worker is
        still registered and has credit."""
        if self.workers.get(w.ident) is not w or not w.has_credit() or req.worker is not None:
            log.error("dispatch_refused", request_id=req.rid, worker=w.name)
            return False
        req.attempts += 1
        req.worker = w.ident
        w.in_flight[req.key] = req.attempts
        self.queues.remove(req)
        self.metrics.on_dispatch(req.model, (time.monotonic() if now is None else now) - req.received)
        entry = self._outgoing.get(w.ident)
        if entry is None:
            entry = self._outgoing[w.ident] = (w, [])
        entry[1].append(req)
        return True

    def _send_requests(self, w: WorkerRecord, reqs: list[PendingRequest]) -> None:
        """One REQUEST message with every request assigned to `w` this turn."""
        ident, pending = w.ident, self.pending
        live, inline = [], True
        for r in reqs:
            if r.worker == ident and pending.get(r.key) is r:
                live.append(r)
                if r.frames:
                    inline = False
        if not live or self.workers.get(ident) is not w:
            return  # answered or requeued meanwhile (the worker was evicted): nothing to send
        now = time.monotonic()
        if w.framing >= 2 and inline:  # the common case: one frame, packed at once
            ms = now * 1000.0
            one = dispatch_one_packed([[r.key, r.attempts, r.model, r.version,
                                        left if (left := r.deadline * 1000.0 - ms) > 0.0 else 0.0,
                                        h if type(h := r.header) is bytes else raw_bytes(h)] for r in live])
            if one is not None:
                if not self._send_worker(w, [REQUEST, *one]):
                    for r in live:
                        r.attempts -= 1  # never delivered: the retry budget counts attempts a worker received
                    self.evict(w, "send_failed")
                return
        entries = [([r.key, r.attempts, r.model, r.version, max(0.0, (r.deadline - now) * 1000.0)], r.header, r.frames)
                   for r in live]
        framed = dispatch_frames_packed if w.framing >= 2 else dispatch_frames  # what the worker said it reads
        sent = 0
        for chunk in dispatch_chunks(entries):  # within what a worker accepts (count, header bytes)
            if not self._send_worker(w, [REQUEST, *framed(chunk)]):
                for r in live[sent:]:
                    r.attempts -= 1  # never delivered: the retry budget counts attempts a worker received
                self.evict(w, "send_failed")
                return
            sent += len(chunk)

    # --------------------------------------------------------------- workers
    def on_worker(self, frames: Sequence[zmq.Frame]) -> None:
        ident = frames[0].bytes
        if self._secure and not self._allowed(frames, "worker"):
            return
        try:
            self._on_worker(ident, frames)
        except ProtocolError as exc:
            self._disconnect_peer(ident, str(exc))
        except Exception:
            log.exception("worker_handler_failed", peer=ident.hex())
            self._disconnect_peer(ident, "the master could not handle this message", ErrorCode.INTERNAL)

    def _disconnect_peer(self, ident: bytes, message: str, code: str = ErrorCode.BAD_REQUEST) -> None:
        """A peer that broke the protocol is forgotten (its work goes elsewhere) and told why."""
        self.bad_worker_messages += 1
        w = self.workers.get(ident)
        log.warning("bad_worker_message", peer=ident.hex(), worker=w.name if w else None, error=message[:300])
        if w is not None:
            self.evict(w, "bad_message")
        self._send_raw(self.backend, [ident, WORKER_PROTO, DISCONNECT, pack(error_body(None, code, message))])

    def _on_worker(self, ident: bytes, frames: Sequence[zmq.Frame]) -> None:
        cmd = frames[2].bytes if len(frames) >= 3 else b""
        if len(frames) < 3 or frames[1].bytes != WORKER_PROTO or cmd not in WORKER_COMMANDS:
            raise ProtocolError("expected [RSW01][command][header...]")
        worker = self.workers.get(ident)
        if cmd == READY:
            self.on_ready(ident, frames[3:], user_id(frames[-1]) if self.cfg.security.enabled else None)
            return
        if worker is None:  # not registered (we restarted, or it was evicted): ask it to register again
            if cmd != DISCONNECT:
                self._send_raw(self.backend, [ident, WORKER_PROTO, DISCONNECT, pack({"reason": "unknown worker"})])
            if cmd == REPLY and len(frames) > 3:
                self._note_late_reply(frames[3], "unknown_worker")  # the first one's id is enough to log
            return
        worker.last_seen = time.monotonic()
        if cmd == REPLY:
            self.on_replies(worker, frames[3:])
        elif cmd == HEARTBEAT:
            self.on_heartbeat(worker, unpack_map(frames[3]) if len(frames) > 3 else {})
        elif cmd == DISCONNECT:
            self.evict(worker, "worker_disconnected")
        else:
            raise ProtocolError("REQUEST and DRAIN go from the master to a worker, not back")

    def on_ready(self, ident: bytes, rest: Sequence[zmq.Frame], user: str | None = None) -> None:
        try:
            hello = parse_ready(unpack_map(rest[0]) if rest else None)
        except ProtocolError as exc:
            raise ProtocolError(f"bad READY: {exc}") from None
        old = self.workers.get(ident)
        if old is not None:
            self.evict(old, "re_registered")
        name = hello.name or ident.hex()
        if user:  # with keys a worker is the name of its key, whatever it announces
            key_name = user.split(":")[1]
            if name != key_name:
                log.warning("worker_name_from_key", announced=name[:MAX_NAME_LEN], key=key_name)
            name = key_name
        w = WorkerRecord(ident, name, hello.models, hello.credit, hello.device, hello.pid,
                         weight=self.cfg.weights.get(name, hello.weight), user=user or None, framing=hello.framing)
        self.workers[ident] = w
        self._models_changed()
        log.info("worker_registered", worker=name, models=sorted(hello.models), credit=hello.credit, device=w.device)
        self._send_worker(w, [HEARTBEAT, pack({"epoch": self.epoch, "framing": FRAMING})])
        for model in hello.models:
            self.dispatch(model)

    def on_heartbeat(self, w: WorkerRecord, info: dict) -> None:
        beat = parse_heartbeat(info)
        changed = beat.models is not None and beat.models != w.models
        if changed:
            w.models = beat.models
            self._models_changed()
        if beat.stats is not None:
            w.stats = beat.stats
        if beat.credit is not None and beat.credit != w.credit:  # its share moved (another master came or went)
            log.info("worker_credit_changed", worker=w.name, credit=beat.credit, was=w.credit)
            w.credit = beat.credit
            changed = changed or bool(w.has_credit())
        if beat.draining and w.state != "draining":
            w.state = "draining"
            log.info("worker_draining", worker=w.name, in_flight=len(w.in_flight))
        if changed:
            self._reroute_queued()
            for model in w.models:
                self.dispatch(model)
            self._fail_orphans()

    def on_replies(self, w: WorkerRecord, frames: Sequence[zmq.Frame]) -> None:
        """A REPLY message: one or more replies (a batch's answers travel together). The common one, a
        result for its request's current attempt that may go to the client byte for byte, is answered
        here (`_forward`) with the books settled per request as `finish` does; what the message adds
        to the counters, metrics and status windows is counted once for it (`_count_forwarded`).
        Anything else takes `on_reply`, the general path."""
        now = time.monotonic()  # one clock read for the message: its answers came together
        epoch, name, ident = self.epoch, w.name, w.ident
        in_flight, pending = w.in_flight, self.pending
        forwarded: dict[tuple[str, int], list[float]] = {}  # (model, version) -> arrival times answered
        held: dict[str, frozenset[int]] = {}  # model -> w.versions(model), asked once per message
        try:
            for header_frame, raw, data, checked in split_results(frames, epoch, name):
                if checked is None and (raw.get("ok") is True and raw.keys() <= REPLY_FIELDS
                                        and type(raw.get("version")) is int):  # the compiled path did not take it
                    checked = (*checked_result(raw, data, epoch, name), raw.get("id"))  # raises like on_reply
                if checked is not None:
                    key, attempt, version, passes, rid = checked
                    req = pending.get(key)
                    if (passes and req is not None and req.worker == ident and req.attempts == attempt
                            and req.client is not None and req.counted and rid == req.rid
                            and (req.version is None or version == req.version)):
                        versions = held.get(req.model)
                        if versions is None:
                            versions = held[req.model] = w.versions(req.model)
                    else:
                        versions = ()
                    if version in versions:  # what on_reply and _version_allowed check
                        if in_flight.get(key) == attempt:
                            del in_flight[key]
                            w.done += 1
                        self._forward(req, [header_frame, *data], version, now, forwarded)
                        continue
                self.on_reply(w, header_frame, unpack_map(header_frame) if raw is None else raw, data, now)
        finally:  # also when a bad reply ends the message: the answers sent before it are counted
            if forwarded:
                self._count_forwarded(forwarded, now)
        for model in w.models:
            self.dispatch(model)

    def _forward(self, req: PendingRequest, body: list, version: int, now: float,
                 forwarded: dict[tuple[str, int], list[float]]) -> None:
        """`finish` for a result of its request's current attempt, from a worker that serves its model
        (so the model is served and counted), its worker slot already given back: the request leaves
        `pending` and its scope's id map, the answer goes out, the caches keep it. Counting is the
        caller's, once per message."""
        key = req.key
        del self.pending[key]
        cid = (req.scope, req.rid)
        if self.held.get(cid) == key:
            del self.held[cid]
        group = forwarded.get((req.model, version))
        if group is None:
            group = forwarded[(req.model, version)] = []
        group.append(req.received)
        service, client = req.service, req.client
        out = self._client_out.get(client) if client in self._batch_clients else None
        if out is not None:  # _send_client for a batching client that has answers this turn already
            out.append(body)
            sent = True
        else:
            sent = self._send_client(client, service, body)
        if req.digest is not None:  # a digest: its model is cacheable
            self._cache_result(req, body, version)
        # a tuple: with the header's msgspec.Raw or bytes in it the GC stops tracking it (see AnsweredCache)
        self.answered.add(cid, req.model, (service, *body), client if sent else None,
                          len(service) + len(body[0]) + (frames_nbytes(body[1:]) if len(body) > 1 else 0))

    def _count_forwarded(self, forwarded: dict[tuple[str, int], list[float]], now: float) -> None:
        """What `finish` counts per answer, for a message's forwarded results: per model and version,
        one counter update, each latency in the status window and the duration histogram."""
        for (model, version), received in forwarded.items():
            self.counters[model].ok += len(received)
            latencies = [now - t for t in received]
            window = self.windows.models.get(model)
            if window is None:
                self.windows.record(model, received[0], True, now)  # creates the model's window (bounded)
                window = self.windows.models.get(model)
                if window is not None and len(latencies) > 1:
                    window.record_all(now, latencies[1:])
            else:
                window.record_all(now, latencies)
            self.metrics.on_answers(model, version, "ok", latencies)
        if len(self.deadlines) > 2 * len(self.pending) + 1024:  # answered entries dominate: drop them
            self.deadlines = [(r.deadline, r.key) for r in self.pending.values()]
            heapq.heapify(self.deadlines)

    def on_reply(self, w: WorkerRecord, header_frame: zmq.Frame, raw: dict, frames: Sequence[zmq.Frame],
                 now: float | None = None) -> None:
        """One reply, found by the master's key (never by the client's id). A result goes to the
        client byte for byte only if its header is exactly what the master would write; its
        version must be one the worker announced and the request allowed."""
        ok = raw.get("ok") is True
        if ok and raw.keys() <= REPLY_FIELDS and type(raw.get("version")) is int:
            key, attempt, version, passes = checked_result(raw, frames, self.epoch, w.name)
            code = clean = None
        else:
            passes = False
            reply = parse_worker_reply(raw, frames)
            key, attempt, code, version = reply.key, reply.attempt, reply.error_code, reply.header.get("version")
            clean = reply.header
        if w.in_flight.get(key) == attempt:
            del w.in_flight[key]
            w.done += 1
        req = self.pending.get(key)
        if req is None or req.worker != w.ident or req.attempts != attempt:
            self._note_late_reply(header_frame, "not_current_attempt")
            return
        if code is None and not self._version_allowed(w, req, version):
            self.bad_worker_messages += 1
            log.warning("reply_version_refused", request_id=req.rid, worker=w.name, version=short_repr(version),
                        announced=sorted(w.versions(req.model)), pinned=req.version)
            self._retry(req, w, "the worker answered with a version it did not announce or the request did not "
                        "allow")
            return
        if clean is None and passes and raw.get("id") == req.rid:  # what forwardable() checks
            body = [header_frame, *frames]
        else:  # re-packed from the checked fields, with the client's id, this master's epoch and the worker's name
            if clean is None:
                clean = parse_worker_reply(raw, frames).header
            header = {**clean, "id": req.rid, "worker": w.name, "epoch": self.epoch}
            body = [pack(header), *(frames if code is None else ())]
        self.finish(req, body, code, version=version if code is None else None, now=now)

    @staticmethod
    def _version_allowed(w: WorkerRecord, req: PendingRequest, version) -> bool:
        """A result's version: an int the worker announced for the model, and the pin if there is one."""
        if type(version) is not int or version not in w.versions(req.model):
            return False
        return req.version is None or version == req.version

    def _note_late_reply(self, header_frame, why: str) -> None:
        try:
            rid = unpack_map(header_frame).get("id")
        except ProtocolError:
            rid = None
        self.late_replies += 1
        self.metrics.on_late_reply()
        log.info("late_reply_dropped", request_id=rid if isinstance(rid, str) else None, why=why)

    def evict(self, w: WorkerRecord, reason: str, tell: bool = False) -> None:
        """Forget a worker; send its in-flight requests elsewhere within their retry budget."""
        self.workers.pop(w.ident, None)
        self._models_changed()
        log.warning("worker_evicted", worker=w.name, reason=reason, in_flight=len(w.in_flight))
        self.metrics.on_evict(reason)
        now = time.monotonic()
        served = self._served_models()
        self.recently_served.update((m, now) for m in w.models if m not in served)
        if tell:
            self._send_raw(self.backend, [w.ident, WORKER_PROTO, DISCONNECT, pack({"reason": reason})])
        for key in w.in_flight:
            req = self.pending.get(key)
            if req is not None and req.worker == w.ident:
                self._retry(req, w, f"worker {w.name} lost ({reason})", now=now, release=False)
        w.in_flight.clear()
        self._reroute_queued()
        for model in sorted({m for other in self.workers.values() for m in other.models} & set(w.models)):
            self.dispatch(model)
        self._fail_orphans()

    def _retry(self, req: PendingRequest, w: WorkerRecord, why: str, now: float | None = None,
               release: bool = True) -> None:
        """The attempt on `w` is over without an answer: queue the request again (at the front, its
        route's choice made anew) within --max-attempts and its deadline, else WORKER_LOST."""
        now = time.monotonic() if now is None else now
        if release and w.in_flight.get(req.key) == req.attempts:
            del w.in_flight[req.key]
        req.worker = None
        if req.attempts < self.cfg.max_attempts and now < req.deadline:
            counters = self._counters(req.model)
            if counters is not None:
                counters.retries += 1
            self.metrics.on_retry(req.model)
            self._reroute(req)
            self.queues.push(req, front=True)
            self.dispatch(req.model)
        else:
            self.fail(req, ErrorCode.WORKER_LOST, f"{why} after {req.attempts} attempt(s)")

    def _reroute(self, req: PendingRequest) -> None:
        """Only a client's pin binds: a version a route chose is chosen again (the worker that held it
        may be gone), and one no worker serves any more becomes any version."""
        if req.pinned or req.client is None:
            return
        route = self.routes.get(req.model)
        req.version = self._routed_version(route, req.tags) if route else None

    def _reroute_queued(self) -> None:
        """Queued requests a route sent to a version nobody serves now are routed again (rare: at an
        eviction or when a worker's versions change), so they do not wait out their deadline."""
        for model in self.queues.models():
            served = self._served_versions(model)
            for pin, _ in self.queues.heads(model):
                if pin is None or pin in served:
                    continue
                for req in [r for r in self.queues.waiting(model) if r.version == pin and not r.pinned
                            and r.client is not None]:
                    self.queues.remove(req)
                    self._reroute(req)
                    self.queues.push(req, front=req.seq < 0)
                self.dispatch(model)

    def _fail_orphans(self) -> None:
        """Queued requests for a model no registered worker serves get their final answer now: not
        during the start-up grace, and not while the model is only unavailable (--unavailable-grace)."""
        if self.in_grace:
            return
        served = self._served_models()
        for req in list(self.pending.values()):
            if req.worker is None and req.model not in served and req.model not in self.recently_served:
                code = ErrorCode.WORKER_LOST if req.attempts else ErrorCode.UNKNOWN_MODEL
                self.fail(req, code, f"no worker serves model {req.model!r}")

    def _expire_unavailable(self, now: float) -> None:
        """A model whose last worker left more than --unavailable-grace ago is unknown again; its
        queued requests get a retryable answer (WORKER_LOST), not UNKNOWN_MODEL."""
        if not self.recently_served:
            return
        served = self._served_models()
        for m, left in list(self.recently_served.items()):
            if m in served:
                del self.recently_served[m]
            elif now - left >= self.cfg.unavailable_grace:
                del self.recently_served[m]
                for req in [r for r in self.pending.values() if r.worker is None and r.model == m]:
                    self.fail(req, ErrorCode.WORKER_LOST,
                              f"model {m!r} is unavailable: no worker has served it for "
                              f"{self.cfg.unavailable_grace:g}s; retry later")

    # ------------------------------------------------------------ answering
    def finish(self, req: PendingRequest, body: list, error_code: str | None, version: int | None = None,
               now: float | None = None) -> None:
        """The one place a request gets its final answer. Every path ends here, so this is where
        the books are settled: the request leaves `pending`, its queue and its scope's id map,
        and a worker credit slot it still holds (its deadline passed in flight) is given back."""
        key = req.key
        if self.pending.pop(key, None) is None:
            return
        model = req.model
        if req.worker is None:  # queued (an assigned request left its queue when it was assigned)
            self.queues.remove(req)
        else:
            w = self.workers.get(req.worker)
            if w is not None and w.in_flight.get(key) == req.attempts:
                del w.in_flight[key]
                self._dirty.add(model)  # dispatch(model): its slot is free
        if req.client is None:  # a shadow copy: nobody waits for it, only metrics count it
            self.metrics.on_shadow(req.model, req.version, error_code or "ok")
            return
        cid = (req.scope, req.rid)
        if self.held.get(cid) == key:
            del self.held[cid]
        now = time.monotonic() if now is None else now
        counters = self.counters.get(model) or self._counters(model)
        served = self._served_cache if self._served_cache is not None else self._served_models()
        if counters is not None:
            if not req.counted:  # it arrived while no worker served the name: counted as unknown then
                self.unknown_model_requests -= 1
                counters.requests += 1
            if error_code is None:
                counters.ok += 1
            else:
                counters.count_error(error_code)
            self.windows.record(model, req.received, error_code is None, now)
        label = version
        if label is None and req.version is not None:  # no reply's version: the pin or route, if a worker serves it
            label = req.version if model in served and req.version in self._served_versions(model) else None
        self.metrics.on_answer(model if model in served else UNSERVED_LABEL,  # never a label a client chose alone
                               label, error_code or "ok", now - req.received)
        service = req.service
        sent = self._send_client(req.client, service, body)
        if error_code is None and req.digest is not None:  # a digest: its model is cacheable
            self._cache_result(req, body, version)
        if error_code not in ErrorCode.RETRYABLE:  # only final answers are remembered for retried ids
            self.answered.add(cid, model, [service, *body], req.client if sent else None)
        if len(self.deadlines) > 2 * len(self.pending) + 1024:  # answered entries dominate: drop them
            self.deadlines = [(r.deadline, r.key) for r in self.pending.values()]
            heapq.heapify(self.deadlines)

    def fail(self, req: PendingRequest, code: str, message: str) -> None:
        log.info("request_failed", request_id=req.rid, model=req.model, code=code, message=message)
        self.finish(req, [pack(error_body(req.rid, code, message, epoch=self.epoch))], code)

    def books(self) -> dict:
        """The credit invariant, for status and for the fault and fuzz tests: every slot a worker's
        record holds belongs to a pending request assigned to that worker for that attempt, so the
        slots add up to the assigned requests and none is lost (`leaked` 0)."""
        held = sum(len(w.in_flight) for w in self.workers.values())
        leaked = sum(1 for w in self.workers.values() for key, attempt in w.in_flight.items()
                     if (r := self.pending.get(key)) is None or r.worker != w.ident or r.attempts != attempt)
        assigned = sum(1 for r in self.pending.values() if r.worker is not None)
        return {"in_flight": held, "assigned": assigned, "leaked": leaked, "pending": len(self.pending),
                "held_ids": len(self.held), "ok": leaked == 0 and held == assigned}

    def _refresh_metrics(self) -> None:
        depths = {m: self.queues.depth(m) for m in self.queues.models() if self._served(m)}
        states: dict[str, int] = {}
        in_flight: dict[str, int] = {}  # per name: workers may share one (with keys: every pod of one key)
        for w in self.workers.values():
            states[w.state] = states.get(w.state, 0) + 1
            in_flight[w.name] = in_flight.get(w.name, 0) + len(w.in_flight)
        self.metrics.refresh(depths, in_flight, states)
        self.metrics.cache_bytes.set(self.responses.bytes)
        self.metrics.cache_evictions.set(self.responses.evictions)
        self._refresh_autoscale(time.monotonic())

    # ------------------------------------------------------------- autoscale (master/autoscale.py)
    def _refresh_autoscale(self, now: float) -> None:
        """Per served model: ongoing requests (queued + in flight), workers serving it (not draining),
        the policy's desired figure (kept in self.scaling for status) and the two gauges."""
        ongoing = {m: self.queues.depth(m) for m in self._served_models()}
        for w in self.workers.values():
            for key in w.in_flight:
                req = self.pending.get(key)
                if req is not None and req.model in ongoing:
                    ongoing[req.model] += 1
        serving = {m: sum(1 for w in self.workers.values() if w.state != "draining" and m in w.models) for m in ongoing}
        prev = getattr(self, "scaling", {})
        self.scaling = {m: autoscale.decide(self.cfg.autoscale_policy, n, serving[m], now, prev.get(m))
                        for m, n in ongoing.items()}
        self.metrics.refresh_autoscale({m: d.desired for m, d in self.scaling.items()},
                                       {m: autoscale.ongoing_per_worker(n, serving[m]) for m, n in ongoing.items()})

    def _expire_deadlines(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, key = heapq.heappop(self.deadlines)
            req = self.pending.get(key)
            if req is not None and req.deadline <= now:
                where = "queued" if req.worker is None else "in flight"
                self.fail(req, ErrorCode.TIMEOUT, f"deadline passed while {where}")

    # --------------------------------------------------------------- admin
    def on_admin(self, frames: Sequence[zmq.Frame]) -> None:
        ident = frames[0].bytes
        user = self.cfg.security.authorize(frames[-1], _ADMIN_ROLES)
        if user is None:
            self.refused += 1
            log.warning("message_refused", socket="admin", user=user_id(frames[-1]))
            return
        envelope = [ident, b""] if len(frames) > 2 and frames[1].bytes == b"" else [ident]
        try:
            cmd = unpack_map(frames[-1]) if len(frames) > 1 else {}
            if user.startswith("master:") and cmd.get("cmd") != "peer":  # a peer master may only sync:
                self.refused += 1  # anything else from its key is refused like a stranger's, unanswered
                log.warning("message_refused", socket="admin", user=user, command=short_repr(cmd.get("cmd")))
                return
            reply = pack(self.on_admin_command(cmd))
        except ProtocolError as exc:
            reply = pack(error_body(None, ErrorCode.BAD_REQUEST, str(exc)))
        except Exception:
            log.exception("admin_handler_failed")
            reply = pack(error_body(None, ErrorCode.INTERNAL, "the master could not handle this command"))
        self._send_raw(self.admin, [*envelope, reply])

    def on_admin_command(self, cmd: dict) -> dict:
        name = cmd.get("cmd")
        if name == "status":
            return {"ok": True, **build_status(self, time.monotonic())}
        if name == "route":
            return self.on_route(cmd)
        if name == "peer":
            self._merge_peer(cmd.get("state"), None)
            return {"ok": True, "state": self._peer_state()}
        if name == "drain":
            target = cmd.get("worker")
            if not isinstance(target, str):
                return error_body(None, ErrorCode.BAD_REQUEST, "drain needs 'worker': a worker name or id")
            matched = [w for w in self.workers.values() if target in (w.name, w.ident.hex())]
            for w in matched:
                w.state = "draining"
                self._send_worker(w, [DRAIN, pack({"reason": "admin"})])
                log.info("worker_draining", worker=w.name, in_flight=len(w.in_flight))
            if not matched:
                return error_body(None, ErrorCode.BAD_REQUEST, f"no worker named {short_repr(target)}")
            return {"ok": True, "draining": [w.name for w in matched]}
        return error_body(None, ErrorCode.BAD_REQUEST,
                          f"unknown admin command {short_repr(name)}; try status, drain or route")

    def on_route(self, cmd: dict) -> dict:
        """Set, promote or clear a model's split (validated against the versions workers serve)."""
        model = cmd.get("model")
        before = dict(self.routes)
        try:
            if cmd.get("clear"):
                if self.routes.pop(model, None) is None:
                    raise routing.RouteError(f"no route for {short_repr(model)}")
            elif cmd.get("promote") is not None:
                self.routes[model] = routing.make_route(model, [(cmd["promote"], 100)],
                                                        available=self._served_versions(model))
            else:
                self.routes[model] = routing.make_route(model, cmd.get("split") or "", cmd.get("sticky_key"),
                                                        cmd.get("shadow"), available=self._served_versions(model))
        except (routing.RouteError, TypeError) as exc:
            return error_body(None, ErrorCode.BAD_REQUEST, str(exc))
        if self.cfg.state_dir:
            try:
                routing.save_routes(self._routes_path(), self.routes)
            except OSError as exc:  # not kept means not changed: the operator must know
                self.routes = before
                return error_body(None, ErrorCode.INTERNAL, f"route not saved to {self._routes_path()}: {exc}")
        self.routes_clock = peering.next_clock(self.routes_clock, self.epoch)
        log.info("route_changed", model=model, route=self.routes[model].to_json() if model in self.routes else None,
                 clock=list(self.routes_clock))
        return {"ok": True, "routes": {m: r.to_json() for m, r in self.routes.items()}}

    # ------------------------------------------------------------ peers
    def _peer_state(self) -> dict:
        """What this master tells its peers: who it is and its route table with its clock."""
        return {"epoch": self.epoch, "routes_clock": list(self.routes_clock), "workers": len(self.workers),
                "routes": {m: r.to_json() for m, r in self.routes.items()}}

    def _sync_peers(self, now: float) -> None:
        msg = [b"", pack({"cmd": "peer", "state": self._peer_state()})]
        for sock, peer in self.peer_socks.items():
            try:
                sock.send_multipart(msg, zmq.NOBLOCK)
                peer.sent_at = now
            except zmq.Again:  # not connected (IMMEDIATE) or backed up: it hears from us next time
                pass

    def on_peer_reply(self, peer: peering.PeerState, frames: Sequence[zmq.Frame]) -> None:
        try:
            reply = unpack_map(frames[-1])
            if reply.get("ok") is True:
                self._merge_peer(reply.get("state"), peer)
        except Exception as exc:  # a peer's odd answer is logged, never the end of the loop
            log.warning("bad_peer_reply", peer=peer.endpoint, error=str(exc)[:300])

    def _merge_peer(self, state, peer: peering.PeerState | None) -> None:
        """A peer's state: note it (status), and take its route table if its clock is newer."""
        if not isinstance(state, dict):
            raise ProtocolError("peer state must be a map")
        epoch = state.get("epoch")
        if peer is not None:
            peer.epoch = epoch if isinstance(epoch, str) else None
            peer.last_heard = time.monotonic()
            workers = state.get("workers")
            peer.workers = workers if type(workers) is int else None
        clock = state.get("routes_clock")
        if peer is not None and peering.newer(clock, (-1, "")):
            peer.routes_clock = peering.clock_of(clock)
        if not peering.newer(clock, self.routes_clock):
            return
        try:
            routes = {m: routing.make_route(m, d.get("split") or "", d.get("sticky_key"), d.get("shadow"))
                      for m, d in peering.peer_routes(state.get("routes")).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("peer_routes_refused", peer=peer.endpoint if peer else None, error=str(exc)[:300])
            return
        self.routes, self.routes_clock = routes, peering.clock_of(clock)
        if self.cfg.state_dir:
            try:
                routing.save_routes(self._routes_path(), self.routes)
            except OSError as exc:
                log.warning("routes_not_saved", error=str(exc))
        log.info("routes_adopted_from_peer", peer=peer.endpoint if peer else None, clock=list(clock),
                 models=sorted(routes))

    def _routes_path(self) -> str:
        return os.path.join(self.cfg.state_dir, "routes.json")

    # ------------------------------------------------------------ security
    def _allowed(self, frames: Sequence[zmq.Frame], role: str) -> bool:
        """With keys: the sender's key is (still) a `role` key. A refused peer gets nothing."""
        if self.cfg.security.authorize(frames[-1], _ROLE_SETS[role]) is not None:
            return True
        self.refused += 1
        log.warning("message_refused", socket=role, user=user_id(frames[-1]))
        return False

    def _cut_revoked(self) -> None:
        """A worker whose key was revoked is evicted at once (its work re-queued elsewhere), not when its
        heartbeats expire: it must not be sent one more client request. The key ring re-reads its
        directory at most every 0.1 s, so this costs a set lookup per worker per turn."""
        if not self.cfg.security.enabled:
            return
        for w in [w for w in self.workers.values() if w.user and not self.cfg.security.still_valid(w.user)]:
            log.warning("worker_key_revoked", worker=w.name)
            self.evict(w, "key_revoked", tell=True)

    def _within_rate(self, ident: bytes, scope: str, service: bytes, rid: str) -> bool:
        """Token bucket per client key (per connection without keys); over it: OVERLOADED + retry_after_s.
        Asked only for a request the master does not hold and has not answered: a resend is never
        limited (it would be told OVERLOADED while its first copy runs)."""
        if self.limiter is None:
            return True
        wait = self.limiter.take(scope if self.cfg.security.enabled else ident, time.monotonic())
        if wait <= 0:
            return True
        self._reply_client(ident, service, error_body(
            rid, ErrorCode.OVERLOADED, f"rate limit: over {self.cfg.rate_limit:g} requests/s for this client",
            retry_after_s=round(wait, 3)))
        log.info("rate_limited", request_id=rid, retry_after_s=round(wait, 3))
        return False

    # --------------------------------------------------------------- sends
    def _reply_client(self, ident: bytes, service: bytes, body: dict) -> None:
        body.setdefault("epoch", self.epoch)
        self._send_client(ident, service, [pack(body)])

    def _send_client(self, ident: bytes, service: bytes, body: list) -> bool:
        """One answer (body: its header frame and tensor frames) to a client: queued for this turn's
        message to a client that batches, else sent now as a message of its own."""
        if ident in self._batch_clients:  # a client that batches: its answers of this turn go together
            out = self._client_out.get(ident)
            if out is None:
                out = self._client_out[ident] = []
            out.append(body)
            return True
        if self._send_raw(self.frontend, [ident, b"", MDP_CLIENT, service, *body]):
            return True
        log.warning("reply_undeliverable", client=ident.hex()[:64])
        return False

    def _flush_clients(self) -> None:
        """Every answer of this turn for a client that batches, in as few messages as the bounds allow
        (--client-batch-max answers, --client-batch-bytes); large tensors stay frames of their own.
        A client that sent "mmi.batch2" gets its answers' headers packed into one frame."""
        if not self._client_out:
            return
        out, self._client_out = self._client_out, {}
        limit_n, limit_b = self.cfg.client_batch_max, self.cfg.client_batch_bytes
        for ident, bodies in out.items():
            packed = self._batch_clients.get(ident) is True
            if packed and len(bodies) <= limit_n:  # the common case: headers only, within the bounds
                headers = [body[0] for body in bodies if len(body) == 1]
                if len(headers) == len(bodies):
                    headers = [h if type(h) is bytes else raw_bytes(h) for h in headers]
                    if sum(map(len, headers)) <= limit_b:  # what bounded_chunks would keep as one chunk
                        if not self._send_raw_batch(ident, [pack(headers)], len(headers)):
                            self._not_delivered(ident, bodies)
                        continue
            for chunk in bounded_chunks(bodies, limit_n, limit_b, frames_nbytes):
                if not self._send_batch(ident, chunk, packed):
                    self._not_delivered(ident, chunk)

    def _not_delivered(self, ident: bytes, bodies: list) -> None:
        """ZeroMQ refused these answers to `ident` (its pipe full, or it is gone) after `answered` booked
        them as delivered there (_send_client queued them): noted, so that socket's resend of one gets
        the answer again rather than an ACK that says it is on its way (review14, issue 22)."""
        for body in bodies:
            try:
                rid = unpack_map(raw_bytes(body[0])).get("id")
            except ProtocolError:
                continue
            if isinstance(rid, str):
                self._undelivered[(ident, rid)] = None
                self._undelivered.move_to_end((ident, rid))
        while len(self._undelivered) > MAX_UNDELIVERED:
            self._undelivered.popitem(last=False)

    def _send_batch(self, ident: bytes, bodies: list, packed: bool) -> bool:
        msg = [ident, b"", MDP_CLIENT, MMI_BATCH_PACKED_BYTES if packed else MMI_BATCH_BYTES,
               *answers_frames(bodies, packed)]
        if self._send_raw(self.frontend, msg):
            return True
        log.warning("reply_undeliverable", client=ident.hex()[:64], answers=len(bodies))
        return False

    def _send_raw_batch(self, ident: bytes, frames: list, count: int) -> bool:
        """An "mmi.batch2" message of `count` answers whose frames (answers_frames' form) are built."""
        if self._send_raw(self.frontend, [ident, b"", MDP_CLIENT, MMI_BATCH_PACKED_BYTES, *frames]):
            return True
        log.warning("reply_undeliverable", client=ident.hex()[:64], answers=count)
        return False

    def _send_worker(self, w: WorkerRecord, parts: list) -> bool:
        return self._send_raw(self.backend, [w.ident, WORKER_PROTO, *parts])

    @staticmethod
    def _send_raw(sock: zmq.Socket, msg: list) -> bool:
        """Send without blocking; False when the peer is gone or at its high-water mark."""
        try:
            send_frames(sock, msg)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == errno.EHOSTUNREACH:
                return False
            raise


def client_scope(frame: zmq.Frame, secure: bool = True) -> str:
    """Whose request ids these are. With keys: the client's CURVE identity ("client:NAME:FP"),
    so no tenant can reach another's answers. Without keys there are no tenants to tell apart
    (anyone who reaches the port may act as anyone), so the scope is the peer's address: clients
    on one host share it, and a reconnect (a new routing id) keeps it, so resends still dedupe.
    `secure` False (no keys, so no ZAP handler and no User-Id): the address is asked for at once
    (asking for a User-Id that is not there raises inside pyzmq, an exception per message)."""
    user = user_id(frame) if secure else None
    if user:
        return user
    try:
        return "addr:" + (frame.get("Peer-Address") or "")
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return "addr:"


def _id_in_use(rid: str, model: str | None) -> dict:
    return error_body(rid, ErrorCode.BAD_REQUEST, f"id in use: this client already sent id {short_repr(rid)} for "
                      f"model {short_repr(model)}; send a new request under a new id")


def serve(cfg: BrokerConfig, announce=None, expose=None) -> None:
    """Bind, expose metrics (`expose(registry)` returns their URL), announce the endpoints (for
    launchers and tests), and run until stopped."""
    broker = Broker(cfg)
    broker.install_signal_handlers()
    metrics_url = expose(broker.metrics.registry) if expose is not None else None
    if announce is not None:
        announce({"role": "master", "pid": os.getpid(), "epoch": broker.epoch, "metrics": metrics_url,
                  **broker.endpoints})
    settle_gc()
    broker.run()


def settle_gc(young: int = GC_YOUNG_THRESHOLD) -> None:
    """The master process's cyclic GC once start-up is done (issue 22, eighth round): what start-up
    built (modules, the books' empty structures, metrics) lives as long as the process, so it is
    frozen out of every later collection (`gc.freeze`: full collections no longer walk it), and
    generation 0 collects every `young` allocations instead of 700, so generations 1 and 2 run ~14x
    less often. Only cycles wait longer to be freed (at most `young` young objects); nothing the
    books hold depends on the GC (every structure is bounded and freed by reference count)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(max(young, 1), older, oldest)
