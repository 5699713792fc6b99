"""Client(address): many requests in flight on one DEALER socket, futures and asyncio forms.

A background I/O thread owns the socket (a socket is not thread-safe); callers hand it
requests through a deque and a wake-up pipe. Reliability (the ZeroMQ guide's Lazy Pirate,
with de-duplication by request id on the master):
  * each request asks the master for an ACK; an unacknowledged request is sent again with
    exponential backoff, under the same id;
  * every master message carries its epoch (one per master process); when the epoch changes
    the master restarted, and requests it had acknowledged are sent again;
  * while requests are pending the client pings the master (mmi.ping) to learn its epoch;
  * after the socket reconnects (a TCP drop: ZeroMQ gives the DEALER a new routing id, so
    answers the master sent meanwhile are lost), every unanswered request is sent again; the
    master routes its answer to the new socket (or resends the answer it remembers);
  * a request with no final answer by its deadline (plus a grace) fails with Timeout locally.

The I/O thread survives anything a caller does (a cancelled future, a bad reply) and `infer()`
never waits longer than its timeout plus the grace. A request id is in flight at most once per
client: reusing one that has no answer yet raises ValueError.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from ringserve.client.errors import RingserveError, Timeout, from_error
from ringserve.protocol.codec import pack
from ringserve.protocol.envelope import client_frames, parse_reply, request_body
from ringserve.protocol.messages import MDP_CLIENT, MMI_PING, ProtocolError
from ringserve.protocol.security import Security

log = structlog.get_logger("ringserve.client")


@dataclass
class Reply:
    id: str
    outputs: dict[str, np.ndarray]
    version: int | None
    worker: str | None
    header: dict


@dataclass
class _Pending:
    rid: str
    frames: list
    future: Future
    deadline: float
    next_retry: float
    backoff: float
    acked_epoch: str | None = None
    sends: int = 0


@dataclass
class ClientStats:
    sent: int = 0
    resent: int = 0
    duplicates_dropped: int = 0
    master_restarts: int = 0
    reconnects: int = 0  # the socket's connection to the master was made again
    loop_errors: int = 0  # exceptions the I/O loop caught and survived


class Client:
    def __init__(self, address: str, timeout: float = 30.0, retry_interval: float = 0.5,
                 max_retry_interval: float = 4.0, ping_interval: float = 0.5, grace: float = 1.0,
                 hwm: int = 100_000, security: Security | None = None):
        self.address, self.timeout = address, timeout
        self.retry_interval, self.max_retry_interval = retry_interval, max_retry_interval
        self.ping_interval, self.grace, self.hwm = ping_interval, grace, hwm
        self.stats = ClientStats()
        self.security = security or Security()  # Security(keys_dir, "client", name) for a CURVE master
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._outbox: collections.deque[_Pending] = collections.deque()
        self._pending: dict[str, _Pending] = {}
        self._ids_lock = threading.Lock()
        self._live_ids: set[str] = set()  # ids handed to infer_async and not yet answered
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._closing = False
        self.epoch: str | None = None
        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._loop, name="ringserve-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API
    def infer(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
              version: int | None = None, tags: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """Run `model` on named inputs (numpy arrays or torch tensors); return numpy outputs.

        Waits at most `timeout` plus the client's grace, whatever happens to the I/O thread.
        `tags` (small str -> str map) travel with the request, e.g. the user id a sticky route keys on.
        """
        timeout = self.timeout if timeout is None else timeout
        fut = self.infer_async(model, inputs, timeout, version, tags=tags)
        try:
            return fut.result(timeout=timeout + self.grace).outputs
        except FutureTimeout:
            fut.cancel()
            raise Timeout("no answer before the deadline", getattr(fut, "request_id", None)) from None

    def infer_async(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
                    version: int | None = None, request_id: str | None = None,
                    tags: Mapping[str, str] | None = None) -> Future:
        """Send now; the Future resolves to a Reply or raises a RingserveError subclass."""
        if self._closing:
            raise RuntimeError("client is closed")
        if not self._thread.is_alive():
            raise RuntimeError("the client's I/O thread has stopped; make a new Client")
        timeout = self.timeout if timeout is None else timeout
        rid = request_id or f"{self._prefix}-{next(self._ids)}"
        body = request_body(rid, inputs, version=version, timeout_ms=timeout * 1000.0, ack=True, tags=tags)
        with self._ids_lock:
            if rid in self._live_ids:
                raise ValueError(f"request id {rid!r} is already in flight on this client; use a new id")
            self._live_ids.add(rid)
        now = time.monotonic()
        fut: Future = Future()
        fut.request_id = rid  # type: ignore[attr-defined]  # for callers correlating their own logs
        p = _Pending(rid, client_frames(model, body), fut, now + timeout + self.grace, now + self.retry_interval,
                     self.retry_interval)
        self._outbox.append(p)
        os.write(self._wake_w, b"x")
        return fut

    async def ainfer(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
                     version: int | None = None, tags: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        reply = await asyncio.wrap_future(self.infer_async(model, inputs, timeout, version, tags=tags))
        return reply.outputs

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._ctx.term()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- I/O loop
    def _loop(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.security.client(sock, "master")
        # Watch the connection before connecting, so the first handshake is seen as the first.
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        self._handshakes = 0
        self._last_ping = 0.0
        try:
            while not self._closing:
                try:
                    self._turn(sock, monitor, poller)
                except Exception:  # nothing a caller or a peer does may end this thread
                    self.stats.loop_errors += 1
                    log.exception("client_loop_error")
        finally:
            for p in self._pending.values():
                self._resolve(p, exc=RingserveError("client closed before an answer arrived", p.rid))
            while self._outbox:  # popleft: callers may still be appending
                p = self._outbox.popleft()
                self._resolve(p, exc=RingserveError("client closed before the request was sent", p.rid))
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def _turn(self, sock: zmq.Socket, monitor: zmq.Socket, poller: zmq.Poller) -> None:
        """One loop turn: take new requests, read the monitor and the socket, run the timers."""
        events = dict(poller.poll(50))
        if self._wake_r in events:
            try:
                os.read(self._wake_r, 65536)
            except BlockingIOError:
                pass
        while self._outbox:
            p = self._outbox.popleft()
            self._pending[p.rid] = p
            self._send(sock, p)
        if monitor in events:
            for _ in range(64):
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_monitor(sock, event["event"])
        if sock in events:
            for _ in range(1024):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    self._on_message(sock, frames)
                except Exception:
                    self.stats.loop_errors += 1
                    log.exception("client_bad_message")
        now = time.monotonic()
        self._on_timers(sock, now)
        if self._pending and now - self._last_ping >= self.ping_interval:
            self._last_ping = now
            self._try_send(sock, client_frames(MMI_PING, [pack({})]))

    def _on_monitor(self, sock: zmq.Socket, event: int) -> None:
        """A new connection to the master after the first: what it had not answered is sent again."""
        if event != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return
        self._handshakes += 1
        if self._handshakes == 1:
            return
        self.stats.reconnects += 1
        log.info("client_reconnected_resending", requests=len(self._pending))
        now = time.monotonic()
        for p in list(self._pending.values()):
            p.acked_epoch = None
            p.backoff = self.retry_interval
            p.next_retry = now + p.backoff
            self._send(sock, p)

    def _resolve(self, p: _Pending, result: Reply | None = None, exc: BaseException | None = None) -> None:
        """Give a request its answer; a future the caller cancelled (or already answered) is left alone."""
        with self._ids_lock:
            self._live_ids.discard(p.rid)
        if p.future.done():
            return
        try:
            if exc is not None:
                p.future.set_exception(exc)
            else:
                p.future.set_result(result)
        except InvalidStateError:  # cancelled between the check and the set
            pass

    def _send(self, sock: zmq.Socket, p: _Pending) -> None:
        p.sends += 1
        self.stats.sent += 1
        if p.sends > 1:
            self.stats.resent += 1
        self._try_send(sock, p.frames)

    @staticmethod
    def _try_send(sock: zmq.Socket, frames: list) -> None:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass  # not acknowledged, so the retry timer sends it again

    def _on_timers(self, sock: zmq.Socket, now: float) -> None:
        for p in list(self._pending.values()):
            if p.future.cancelled():  # the caller gave up: stop sending it
                del self._pending[p.rid]
                self._resolve(p)
            elif now >= p.deadline:
                del self._pending[p.rid]
                self._resolve(p, exc=Timeout("no answer from the master before the deadline", p.rid))
            elif p.acked_epoch is None and now >= p.next_retry:
                p.backoff = min(p.backoff * 2, self.max_retry_interval)
                p.next_retry = now + p.backoff
                self._send(sock, p)

    def _on_message(self, sock: zmq.Socket, frames: list) -> None:
        if len(frames) < 4 or frames[1].bytes != MDP_CLIENT:
            log.warning("client_bad_frame", frames=len(frames))
            return
        try:
            header, outputs = parse_reply(frames[3:])
        except ProtocolError as exc:
            log.warning("client_bad_reply", error=str(exc))
            return
        epoch = header.get("epoch")
        self._observe_epoch(sock, epoch if isinstance(epoch, str) else None)
        rid = header.get("id") if isinstance(header.get("id"), str) else None
        p = self._pending.get(rid) if rid is not None else None
        if header.get("ack"):
            if p is not None:
                p.acked_epoch = header.get("epoch")
            return
        if rid is None:
            return  # a ping answer, or an error for something unparseable
        if p is None:
            self.stats.duplicates_dropped += 1
            return
        del self._pending[rid]
        if header.get("ok"):
            self._resolve(p, Reply(rid, outputs, header.get("version"), header.get("worker"), header))
        else:
            self._resolve(p, exc=from_error(header.get("error"), rid))

    def _observe_epoch(self, sock: zmq.Socket, epoch: str | None) -> None:
        if not epoch or epoch == self.epoch:
            return
        if self.epoch is not None:
            self.stats.master_restarts += 1
            lost = [p for p in self._pending.values() if p.acked_epoch is not None and p.acked_epoch != epoch]
            log.info("master_restarted_resending", old=self.epoch, new=epoch, requests=len(lost))
            for p in lost:
                p.acked_epoch = None
                p.backoff = self.retry_interval
                p.next_retry = time.monotonic() + p.backoff
                self._send(sock, p)
        self.epoch = epoch
