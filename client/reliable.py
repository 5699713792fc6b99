"""What makes a client reliable, apart from how its socket is driven.

The thread-based ``Client`` and the asyncio ``AsyncClient`` share this: both own one DEALER
and call these methods from the one thread that owns it. The rules (the ZeroMQ guide's Lazy
Pirate, with de-duplication by request id on the master):
  * a request is sent once, without asking for an acknowledgement: on a healthy connection
    ZeroMQ over TCP does not lose it, and an ACK per request would double the master's sends;
  * a request with no answer after ``retry_interval`` is sent again under the same id, this
    time asking for an ACK; once the master acknowledges it (it holds it, or it answers it
    again from its cache) resends stop, else they go on with exponential backoff;
  * every master message carries its epoch (one per master process), and while requests are
    pending the client pings the master (mmi.ping) to learn it: when the epoch changes the
    master restarted, and every pending request is sent again;
  * after the socket reconnects (a TCP drop: ZeroMQ gives the DEALER a new routing id, so
    answers the master sent meanwhile are lost), every pending request is sent again; the
    master routes its answer to the new socket (or resends the answer it remembers);
  * a request with no final answer by its deadline (plus a grace) fails with Timeout locally;
    when the master never answered at all, its message says so and what the socket's monitor saw
    (no connection, a handshake ZeroMQ reported refused, or silence after a handshake);
  * the socket is made in the constructor's thread (``open_dealer``): keys or an address that
    cannot be used raise ``ConfigError`` to the caller instead of failing in a loop;
  * sends are coalesced: every request (or resend) of one turn of the client's I/O loop goes in
    one message (``mmi.batch``, bounded by ``batch_max`` requests, never more than the
    MAX_CLIENT_BATCH a master takes, and ``batch_bytes``), and a master answers a batching client
    with every answer of its turn in one message; a lone request goes as a plain RFC 7 message
    (no added delay when there is nothing to coalesce).
    Batches go as ``mmi.batch2`` (every header packed into the first frame, so a batch of inline
    tensors is one frame; the master answers in kind); a master that answers ``501`` to it gets
    ``mmi.batch`` (a frame per header), and one that answers ``501`` to that (it predates
    batches) gets one message per request;
  * an answer's tensors are checked when it arrives (an answer that fails is dropped, so its request
    is resent or times out) and made into numpy arrays when the caller first reads
    ``Reply.outputs`` (``client/reply.py``); the timers walk the pending requests only when one of
    them may be due (a deadline or a resend) and every ``CANCEL_SWEEP_S`` for cancelled futures;
  * given several masters (active-active), a client talks to one at a time, picked at random so
    clients spread over them; when that master has been silent for ``failover_after`` while
    requests wait (it died, hung or was cut off: pings go every ``ping_interval``), the client
    moves its socket to the next master and sends every pending request there. The old master's
    late answers go to a connection that no longer exists, so each request is answered once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from ringserve.client.errors import ConfigError, RingserveError, Timeout, from_error
from ringserve.client.reply import Reply
from ringserve.protocol.codec import check_tensors, encode_tensors, pack, unpack_map
from ringserve.protocol.fastanswer import split_answers
from ringserve.protocol.envelope import (
    MAX_CLIENT_BATCH, MAX_NAME_LEN, batch_frames, client_frames, is_model_name, pack_header, packed_frames, parse_reply, request_header,
    split_replies,
)
from ringserve.protocol.messages import (
    MDP_CLIENT, MMI_BATCH, MMI_BATCH_PACKED, MMI_NOT_IMPLEMENTED, MMI_PING, ProtocolError,
)
from ringserve.protocol.security import Security, SecurityError
from ringserve.protocol.sockets import frames_nbytes, recv_frames, send_frames

log = structlog.get_logger("ringserve.client")

TIMER_STEP_S = 0.01
CANCEL_SWEEP_S = 0.1  # how soon a request whose future the caller cancelled leaves the books at the latest
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: `int & zmq.POLLIN` runs enum code per call
MAX_MONITOR_EVENTS = 64  # monitor events read per call


MONITOR_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def master_addresses(address: str | list[str] | tuple[str, ...]) -> list[str]:
    """'tcp://a:5555,tcp://b:5555' or a list -> the masters' client endpoints (ConfigError if none)."""
    items = address.split(",") if isinstance(address, str) else list(address) if isinstance(address, (list, tuple)) \
        else None
    out = [a.strip() for a in items or [] if isinstance(a, str) and a.strip()]
    if not out:
        raise ConfigError(f"the master's address must be a string such as tcp://host:5555 (or several, "
                          f"comma-separated), got {address!r}")
    return out


def first_master(addresses: list[str]) -> int:
    """Which master a new client starts on: a random one, so clients spread over active masters."""
    return random.randrange(len(addresses))


def open_dealer(ctx: zmq.Context, address: str, hwm: int, security: Security) -> tuple[zmq.Socket, zmq.Socket]:
    """The client's DEALER to the master and its monitor (watched from before the connect, so the
    first handshake is seen as the first). Called in the caller's thread by both clients' constructors,
    so keys that cannot be used or an address ZeroMQ cannot take raise ConfigError there, not in a loop
    nobody watches; afterwards only the thread that drives the client may use the sockets."""
    if not isinstance(address, str) or not address:
        raise ConfigError(f"the master's address must be a string such as tcp://host:5555, got {address!r}")
    sock = ctx.socket(zmq.DEALER)
    monitor = None
    try:
        for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, hwm), (zmq.RCVHWM, hwm), (zmq.RECONNECT_IVL, 100),
                           (zmq.RECONNECT_IVL_MAX, 1000)):
            sock.setsockopt(opt, value)
        try:
            security.client(sock, "master")
        except SecurityError as exc:
            raise ConfigError(f"client keys: {exc}") from exc
        monitor = sock.get_monitor_socket(MONITOR_EVENTS)
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot connect to {address!r}: {exc} (an address looks like tcp://host:5555)") from exc
    except BaseException:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
        raise
    return sock, monitor


def handshake_failure(event: int, value: int, curve: bool) -> str:
    """What a failed handshake the monitor reported means, in words (curve: this client uses keys)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (f"the master refused this client's key (ZAP status {value}: a key it does not know, "
                "or not a client key)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return ("security mismatch: this client uses CURVE keys and the master does not" if curve else
                "security mismatch: the master requires CURVE keys and this client has none "
                "(give it security=Security(KEYS_DIR, 'client'))")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return f"ZMTP protocol error {value:#x}: is that a ringserve master's client endpoint?"
    if curve:
        return "the CURVE handshake failed: is the master's public key in the keys directory the right one?"
    why = os.strerror(value) if isinstance(value, int) and value > 0 else value
    # A plaintext client meeting a CURVE server sees either the mismatch above or, when the server
    # closed first, only this: the likely cause is the same.
    return (f"the master closed the connection during the handshake ({why}): it probably requires CURVE keys "
            "and this client has none (give it security=Security(KEYS_DIR, 'client'))")


MMI_BATCH_BYTES = MMI_BATCH.encode()
MMI_BATCH_PACKED_BYTES = MMI_BATCH_PACKED.encode()
_INVALID_STATE = (concurrent.futures.InvalidStateError, asyncio.InvalidStateError)


def _tensors_ok(meta: object, data: list | None) -> bool:
    """An answer's tensors checked before anything of it is believed (a bad one is dropped whole,
    logged): the one check of on_batch's common path and of on_answer."""
    try:
        check_tensors(meta, data)
    except ProtocolError as exc:
        log.warning("client_bad_reply", error=str(exc))
        return False
    return True


@dataclass
class ClientStats:
    sent: int = 0
    resent: int = 0
    duplicates_dropped: int = 0
    master_restarts: int = 0
    reconnects: int = 0  # the socket's connection to the master was made again
    failovers: int = 0  # moved to another master (the one it was on went silent)
    batches_sent: int = 0  # messages that carried several requests (mmi.batch)
    batches_received: int = 0  # messages from the master that carried several answers
    handshake_failures: int = 0  # connections the security handshake refused (see Reliability.link)
    loop_errors: int = 0  # exceptions the I/O loop caught and survived


@dataclass(slots=True)  # one per request: slots make it quicker to build and read
class Pending:
    rid: str
    service: bytes
    header: dict  # the request header as first sent (no ack asked)
    head: bytes  # that header packed, once, when the request was made (a resend asking for an ACK packs its own)
    tensors: list  # out-of-line tensor frames
    future: Any  # concurrent.futures.Future or asyncio.Future
    deadline: float
    next_retry: float
    backoff: float
    model: str = ""  # the service as text: a packed batch's rows carry it so
    acked_epoch: str | None = None
    sends: int = 0
    queued: bool = False  # in this turn's outgoing list already (flush sends it once)

    def packed_header(self) -> bytes:
        """The header as this send carries it: the first send as built, a resend asking for an ACK."""
        return self.head if self.sends <= 1 else pack({**self.header, "ack": True})

    def body(self) -> list:
        """The request's frames: its header, then its out-of-line tensors."""
        return [self.packed_header(), *self.tensors]

    def frames(self) -> list:
        return client_frames(self.service, self.body())


def new_pending(rid: str, model: str, inputs: Mapping[str, Any], timeout: float, grace: float, retry: float,
                version: int | None, tags: Mapping[str, str] | None, future) -> Pending:
    """A request ready to send (encoded and its header packed in the caller's thread, so the I/O loop
    only sends, and a header that cannot be packed raises to the caller here, not in the loop).
    A model name no master takes as one raises ValueError here too: a master answers an empty or
    too long name with no id, and an "mmi." name as an RFC 8 service (a bare 501 that a batching
    client would take for a master that cannot batch), so the request could only time out."""
    if not is_model_name(model):
        raise ValueError(f"model name must be 1..{MAX_NAME_LEN} characters, not starting with 'mmi.', "
                         f"got {model[:40]!r}")
    meta, tensors = encode_tensors(inputs)
    now = time.monotonic()
    header = request_header(rid, meta, version=version, timeout_ms=timeout * 1000.0, tags=tags)
    return Pending(rid, model.encode(), header, pack_header(header), tensors, future, now + timeout + grace,
                   now + retry, retry, model)


class Reliability:
    """The pending requests and the rules above; `resolved(rid)` is called for every final answer."""

    def __init__(self, retry_interval: float, max_retry_interval: float, ping_interval: float,
                 resolved: Callable[[str], None] | None = None, address: str = "the master",
                 curve: bool = False, endpoints: list[str] | None = None, current: int = 0,
                 failover_after: float = 0.6, batch_max: int = 256, batch_bytes: int = 4 << 20):
        # a master refuses a batch of more than MAX_CLIENT_BATCH requests whole (an error with no id:
        # none of them would be answered), so a larger batch_max is cut to it
        self.batch_max, self.batch_bytes = max(1, min(batch_max, MAX_CLIENT_BATCH)), batch_bytes
        self.batching: bool | None = None  # None: not known yet (try), False: the master answered 501
        self.packed = True  # send "mmi.batch2" (headers in one frame) until the master answers it 501
        self.outgoing: list[Pending] = []  # queued this turn, sent by flush
        self.endpoints = endpoints or [address]
        self.current = current
        self.failover_after = failover_after
        if len(self.endpoints) > 1:  # pings must come often enough to tell a silent master in time
            ping_interval = min(ping_interval, failover_after / 3)
        self.retry_interval, self.max_retry_interval, self.ping_interval = (
            retry_interval, max_retry_interval, ping_interval)
        self.address, self.curve = self.endpoints[current], curve
        self.last_heard = self.expecting_since = 0.0
        # What the monitor and the socket told us, so that a Timeout can say what is known.
        self.connected = False  # a TCP connection was made at least once
        self.link_up = False  # a handshake succeeded and no disconnect came since
        self.heard = False  # the master sent something at least once
        self.handshake_failure: str | None = None  # the last refused handshake, in words
        self.pending: dict[str, Pending] = {}
        self.stats = ClientStats()
        self.epoch: str | None = None
        self.handshakes = 0
        self.last_ping = 0.0
        self._next_timers = 0.0
        self._due = 0.0  # no pending request has a deadline or a resend before this (a lower bound)
        self._sweep_at = 0.0  # the next walk for cancelled futures, however far off `_due` is
        self._resolved = resolved  # None: nothing to tell (AsyncClient), so no call per answer

    # ------------------------------------------------------------- sending
    def start(self, sock: zmq.Socket, p: Pending) -> None:
        if not self.pending:
            self.expecting_since = time.monotonic()  # silence counts from when an answer is due
        self.pending[p.rid] = p
        due = p.next_retry if p.next_retry < p.deadline else p.deadline
        if due < self._due:
            self._due = due
        self.send(sock, p)

    def send(self, sock: zmq.Socket, p: Pending) -> None:
        """Queue `p` for this turn's message (flush sends it; the caller's loop calls flush). A request
        queued twice in one turn (a resend, then a failover) goes once."""
        p.sends += 1
        self.stats.sent += 1
        if p.sends > 1:
            self.stats.resent += 1
        if not p.queued:
            p.queued = True
            self.outgoing.append(p)

    def flush(self, sock: zmq.Socket) -> None:
        """Send what this turn queued: one request alone, several in as few batches as the bounds allow."""
        if not self.outgoing:
            return
        out, self.outgoing = self.outgoing, []
        for p in out:
            p.queued = False
        if len(out) == 1 or self.batching is False:
            for p in out:
                self._send_frames(sock, [b"", MDP_CLIENT, p.service, p.packed_header(), *p.tensors])
            return
        # (header, tensors, request) per request, cut by count and bytes: each header is packed once
        chunk: list = []
        size, batch_max, batch_bytes = 0, self.batch_max, self.batch_bytes
        for p in out:
            head, tensors = p.packed_header(), p.tensors
            extra = len(head) + frames_nbytes(tensors) if tensors else len(head)
            if chunk and (len(chunk) >= batch_max or size + extra > batch_bytes):
                self._send_batch(sock, chunk)
                chunk, size = [], 0
            chunk.append((head, tensors, p))
            size += extra
        self._send_batch(sock, chunk)

    def _send_batch(self, sock: zmq.Socket, chunk: list) -> None:
        if len(chunk) == 1:
            head, tensors, p = chunk[0]
            self._send_frames(sock, [b"", MDP_CLIENT, p.service, head, *tensors])
            return
        self.stats.batches_sent += 1
        if self.packed:  # rows [service, header as bin] straight from the requests (batch_frames_packed's layout)
            body = packed_frames(([p.model, head], tensors) for head, tensors, p in chunk)
            self._send_frames(sock, [b"", MDP_CLIENT, MMI_BATCH_PACKED_BYTES, *body])
        else:
            body = batch_frames([(p.service, [head, *tensors]) for head, tensors, p in chunk])
            self._send_frames(sock, [b"", MDP_CLIENT, MMI_BATCH_BYTES, *body])

    @staticmethod
    def _send_frames(sock: zmq.Socket, frames: list) -> None:
        try:
            send_frames(sock, frames)
        except zmq.Again:
            pass  # no answer, so the retry timer sends it again

    def resend_all(self, sock: zmq.Socket) -> None:
        now = time.monotonic()
        self._due = min(self._due, now + self.retry_interval)
        for p in list(self.pending.values()):
            p.acked_epoch = None
            p.backoff = self.retry_interval
            p.next_retry = now + p.backoff
            self.send(sock, p)

    # ------------------------------------------------------------- events
    def on_timers(self, sock: zmq.Socket, now: float, early: float = 0.0) -> None:
        """Cancellations, deadlines, resends and pings, at most every TIMER_STEP_S however busy the
        loop is. The walk over the pending requests runs only when one of them may be due (`_due`,
        kept as the earliest deadline or resend of the last walk and of every request since) or, for
        futures the caller cancelled, every CANCEL_SWEEP_S: a cancelled request is never sent again
        (the walk that would resend it drops it first), it only leaves the books up to that late.

        `early`: a caller awake anyway (AsyncClient's read) runs now what falls due within it, where
        early is harmless: the step, the sweep for cancelled futures and the ping (they move on from
        now). Deadlines, resends and the failover compare with `now` itself. Without it, a read that
        ran the timers a little early did nothing and set the timer for the same moment, so the next
        reads ran them again (about one run per message under load instead of one per sweep)."""
        soon = now + early
        if soon < self._next_timers:
            return
        self._next_timers = now + TIMER_STEP_S
        if self.pending and (now >= self._due or soon >= self._sweep_at):
            self._sweep_at = now + CANCEL_SWEEP_S
            due = float("inf")
            for p in list(self.pending.values()):
                if p.future.cancelled():  # the caller gave up: stop sending it
                    del self.pending[p.rid]
                    self.resolve(p)
                    continue
                if now >= p.deadline:
                    del self.pending[p.rid]
                    self.resolve(p, exc=Timeout(self.timeout_message(), p.rid))
                    continue
                if p.acked_epoch is None:
                    if now >= p.next_retry:
                        p.backoff = min(p.backoff * 2, self.max_retry_interval)
                        p.next_retry = now + p.backoff
                        self.send(sock, p)
                    if p.next_retry < due:
                        due = p.next_retry
                if p.deadline < due:
                    due = p.deadline
            self._due = due
        if (self.pending and len(self.endpoints) > 1
                and now - max(self.last_heard, self.expecting_since) > self.failover_after):
            self.fail_over(sock, now)
        if self.pending and soon - self.last_ping >= self.ping_interval:
            self.last_ping = now
            try:
                sock.send_multipart(client_frames(MMI_PING, [pack({})]), zmq.NOBLOCK)
            except zmq.Again:
                pass

    def next_due(self, now: float) -> float:
        """The earliest moment `on_timers` may have work (a deadline or resend, the sweep for
        cancelled futures, a ping, a failover check), never before its own TIMER_STEP_S spacing;
        `inf` with nothing pending (then it has none). A loop that sleeps until this instead of
        waking every TIMER_STEP_S does the same work at the same moments, less the empty wakes."""
        if not self.pending:
            return float("inf")
        due = min(self._due, self._sweep_at, self.last_ping + self.ping_interval)
        if len(self.endpoints) > 1:
            due = min(due, max(self.last_heard, self.expecting_since) + self.failover_after)
        return due if due > self._next_timers else self._next_timers

    def read_messages(self, sock: zmq.Socket, limit: int, probe: bool = False) -> bool:
        """Handle up to `limit` waiting messages; True when the limit was reached (more may wait).
        Nothing a peer sends stops the client: a message that trips a bug is logged and counted.

        After a message, whether another waits is asked of the socket (ZMQ_EVENTS) rather than found
        by a recv that fails: both process libzmq's commands, but the failed recv also raises zmq.Again
        (measured 27 against 15 us here). `probe`: ask before the first recv too (a read nothing
        announced); else the first is tried at once (the descriptor or the poller said so). Either
        way the last call finds the socket empty, which re-arms its descriptor's edge."""
        for i in range(limit):
            if (i or probe) and not sock.getsockopt(EVENTS) & POLLIN:
                return False
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return False
            try:
                self.on_message(sock, frames)
            except Exception:
                self.stats.loop_errors += 1
                log.exception("client_bad_message")
        return True

    def read_monitor(self, sock: zmq.Socket, monitor: zmq.Socket) -> bool:
        """Handle the monitor's waiting events; True when a new connection was made. Events are rare
        and the timer looks often: the socket is asked first (ZMQ_EVENTS), no failed recv raised."""
        handshake = False
        for _ in range(MAX_MONITOR_EVENTS):
            if not monitor.getsockopt(EVENTS) & POLLIN:
                break
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = event["event"]
            if kind == zmq.EVENT_CONNECTED:
                self.connected = True
            elif kind == zmq.EVENT_DISCONNECTED:
                self.link_up = False
            elif kind in HANDSHAKE_FAILED:
                self.on_handshake_failed(handshake_failure(kind, event["value"], self.curve))
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.link_up = True
                self.on_handshake(sock)
                handshake = True
        return handshake

    def fail_over(self, sock: zmq.Socket, now: float) -> None:
        """The master this client is on has been silent past failover_after while answers were due:
        move the socket to the next master and send it everything still unanswered."""
        old = self.endpoints[self.current]
        self.current = (self.current + 1) % len(self.endpoints)
        self.address = self.endpoints[self.current]
        try:
            sock.disconnect(old)  # what was queued for the old one is dropped, its late answers too
        except zmq.ZMQError:
            pass
        sock.connect(self.address)
        self.stats.failovers += 1
        self.batching = None  # the next master may be an older one: try again
        self.packed = True
        self.epoch = None  # the new master's epoch is news, not a restart
        self.handshakes = 0  # its first handshake must not resend again: resend_all below does
        self.link_up = False
        self.last_heard = self.expecting_since = now
        log.warning("client_failover", old=old, new=self.address, requests=len(self.pending))
        self.resend_all(sock)

    def on_handshake_failed(self, why: str) -> None:
        """ZeroMQ says the security handshake failed: logged once per reason, told in every Timeout."""
        self.stats.handshake_failures += 1
        if why != self.handshake_failure:
            log.warning("client_handshake_failed", master=self.address, reason=why)
        self.handshake_failure = why

    def timeout_message(self) -> str:
        """Why a request got no answer, as far as the client can tell."""
        if self.heard and self.link_up:
            return "no answer from the master before the deadline"
        hint = f"no answer from {self.address}: is the master up, are the keys right?"
        if self.heard:
            return f"{hint} (the connection to it is down)"
        if self.link_up or self.handshakes:
            return f"{hint} (connected, but the master never sent anything back)"
        if self.handshake_failure:
            return f"{hint} ({self.handshake_failure})"
        if self.connected:
            return f"{hint} (a connection was made but its handshake never completed)"
        return f"{hint} (no connection could be made)"

    def on_handshake(self, sock: zmq.Socket) -> None:
        """A new connection to the master after the first: what it had not answered is sent again."""
        self.handshakes += 1
        if self.handshakes == 1:
            return
        self.stats.reconnects += 1
        log.info("client_reconnected_resending", requests=len(self.pending))
        self.resend_all(sock)

    def on_message(self, sock: zmq.Socket, frames: list) -> None:
        if len(frames) < 4 or frames[1].bytes != MDP_CLIENT:
            log.warning("client_bad_frame", frames=len(frames))
            return
        service = frames[2].bytes
        if service == MMI_BATCH_BYTES or service == MMI_BATCH_PACKED_BYTES:
            self.on_batch(sock, frames[3:], service == MMI_BATCH_PACKED_BYTES)
            return
        try:
            header, outputs = parse_reply(frames[3:])
        except ProtocolError as exc:
            log.warning("client_bad_reply", error=str(exc))
            return
        self.on_answer(sock, header, None, time.monotonic(), outputs)

    def on_batch(self, sock: zmq.Socket, frames: list, packed: bool = False) -> None:
        """A master's answers in one message (either form: split_replies reads both); or its 501: to
        "mmi.batch2", it predates packed batches, so "mmi.batch" from now on; to "mmi.batch", it
        predates batches, so every request goes on its own (and what it did not take is sent again)."""
        if len(frames) == 1 and frames[0].bytes == MMI_NOT_IMPLEMENTED:
            if packed:
                if self.packed:
                    self.packed = False
                    log.info("master_does_not_pack_batches", master=self.address)
                    self.resend_all(sock)
                return
            if self.batching is not False:
                self.batching = False
                log.info("master_does_not_batch", master=self.address)
                self.resend_all(sock)
            return
        fast = split_answers(frames) if packed else None
        if fast is not None:
            self._on_answers(sock, fast)
            return
        try:
            answers = split_replies(frames)
        except ProtocolError as exc:
            log.warning("client_bad_reply", error=str(exc))
            return
        self.batching = True
        self.stats.batches_received += 1
        self.heard = True
        self.last_heard = time.monotonic()  # one clock read for the message, not one per answer
        on_answer, pending, resolved = self.on_answer, self.pending, self._resolved
        for _, header, data in answers:
            # The common answer, decided here without on_answer's and resolve's calls (under load
            # each costs about as much as the books they keep): a result for a request still
            # waiting, in the epoch already known, no ACK. Anything else goes to on_answer, which
            # decides the same for this one (same checks, in the same order of effect).
            get = header.get
            rid = get("id")
            if (get("ok") is True and type(rid) is str and get("epoch") == self.epoch and not get("ack")
                    and (p := pending.get(rid)) is not None):
                meta = get("outputs", [])
                if not _tensors_ok(meta, data):
                    continue
                del pending[rid]
                if resolved is not None:
                    resolved(rid)
                try:
                    p.future.set_result(Reply(rid, None, get("version"), get("worker"), header, meta, data or ()))
                except _INVALID_STATE:  # cancelled (or answered) already
                    pass
                continue
            on_answer(sock, header, data)

    def _on_answers(self, sock: zmq.Socket, answers: list) -> None:
        """on_batch's loop for a message the compiled path took whole (protocol/fastanswer.py: every
        header typed and bounded, every tensor list checked against its frames, so `_tensors_ok` holds
        for each): the same decisions as on_batch's common path, and anything else (an ACK, another
        epoch, a request no longer waiting) goes to on_answer with the header's map, which decides it
        as for the Python path (its checks made again)."""
        self.batching = True
        self.stats.batches_received += 1
        self.heard = True
        self.last_heard = time.monotonic()
        on_answer, pending, resolved = self.on_answer, self.pending, self._resolved
        for raw, rid, epoch, ack, version, worker, meta, data in answers:
            if epoch == self.epoch and not ack and (p := pending.get(rid)) is not None:
                del pending[rid]
                if resolved is not None:
                    resolved(rid)
                try:
                    p.future.set_result(Reply(rid, None, version, worker, None, meta, data or (), raw))
                except _INVALID_STATE:  # cancelled (or answered) already
                    pass
                continue
            on_answer(sock, unpack_map(raw), data)

    def on_answer(self, sock: zmq.Socket, header: dict, data: list | None, now: float | None = None,
                  outputs: dict | None = None) -> None:
        """One answer: an ACK, a result (`data`: its tensor frames, checked here, only for a request
        still waiting, and made into arrays when the caller reads them; or `outputs` decoded already),
        an error, or a duplicate. `now` None: the caller (on_batch) already noted the master was
        heard, once for its whole message."""
        if now is not None:
            self.heard = True
            self.last_heard = now
        get = header.get
        rid = get("id")
        if type(rid) is not str:
            rid = None
        p = self.pending.get(rid) if rid is not None else None
        ok = get("ok")
        meta = None
        if ok and outputs is None and p is not None and not get("ack"):
            meta = get("outputs", [])
            if not _tensors_ok(meta, data):
                return
        epoch = get("epoch")
        if epoch != self.epoch:  # the same epoch as before (the common case) changes nothing
            self.observe_epoch(sock, epoch if isinstance(epoch, str) else None)  # resends, removes nothing
        if get("ack"):
            if p is not None:
                p.acked_epoch = self.epoch
            return
        if rid is None:
            return  # a ping answer, or an error for something unparseable
        if p is None:
            self.stats.duplicates_dropped += 1
            return
        del self.pending[rid]
        if ok:
            self.resolve(p, Reply(rid, outputs if meta is None else None, get("version"), get("worker"), header,
                                  meta, data or ()))
        else:
            self.resolve(p, exc=from_error(get("error"), rid, get("retry_after_s")))

    def observe_epoch(self, sock: zmq.Socket, epoch: str | None) -> None:
        if not epoch or epoch == self.epoch:
            return
        if self.epoch is not None:  # the master restarted: it holds none of what we sent before
            self.stats.master_restarts += 1
            log.info("master_restarted_resending", old=self.epoch, new=epoch, requests=len(self.pending))
            self.epoch = epoch
            self.resend_all(sock)
        self.epoch = epoch

    # ------------------------------------------------------------- answers
    def resolve(self, p: Pending, result: Reply | None = None, exc: BaseException | None = None) -> None:
        """Give a request its answer; a future the caller cancelled (or already answered) is left alone
        (both kinds of future refuse a second set with InvalidStateError: no done() asked first)."""
        if self._resolved is not None:
            self._resolved(p.rid)
        try:
            if exc is not None:
                p.future.set_exception(exc)
            else:
                p.future.set_result(result)
        except _INVALID_STATE:  # cancelled (or answered) already
            pass

    def fail_all(self, message: str) -> None:
        for p in list(self.pending.values()):
            self.resolve(p, exc=RingserveError(message, p.rid))
        self.pending.clear()
