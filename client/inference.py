"""Client(address): many requests in flight on one DEALER socket, futures and asyncio forms.

A background I/O thread owns the socket (a socket is not thread-safe); callers hand it
requests through a deque and a wake-up pipe. Reliability (the ZeroMQ guide's Lazy Pirate,
with de-duplication by request id on the master):
  * each request asks the master for an ACK; an unacknowledged request is sent again with
    exponential backoff, under the same id;
  * every master message carries its epoch (one per master process); when the epoch changes
    the master restarted, and requests it had acknowledged are sent again;
  * while requests are pending the client pings the master (mmi.ping) to learn its epoch;
  * a request with no final answer by its deadline (plus a grace) fails with Timeout locally.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import structlog
import zmq

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
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._closing = False
        self.epoch: str | None = None
        self._ctx = zmq.Context()
        self._thread = threading.Thread(target=self._loop, name="ringserve-client-io", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API
    def infer(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
              version: int | None = None) -> dict[str, np.ndarray]:
        """Run `model` on named inputs (numpy arrays or torch tensors); return numpy outputs."""
        return self.infer_async(model, inputs, timeout, version).result().outputs

    def infer_async(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
                    version: int | None = None, request_id: str | None = None) -> Future:
        """Send now; the Future resolves to a Reply or raises a RingserveError subclass."""
        if self._closing:
            raise RuntimeError("client is closed")
        timeout = self.timeout if timeout is None else timeout
        rid = request_id or f"{self._prefix}-{next(self._ids)}"
        body = request_body(rid, inputs, version=version, timeout_ms=timeout * 1000.0, ack=True)
        now = time.monotonic()
        fut: Future = Future()
        p = _Pending(rid, client_frames(model, body), fut, now + timeout + self.grace, now + self.retry_interval,
                     self.retry_interval)
        self._outbox.append(p)
        os.write(self._wake_w, b"x")
        return fut

    async def ainfer(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
                     version: int | None = None) -> dict[str, np.ndarray]:
        reply = await asyncio.wrap_future(self.infer_async(model, inputs, timeout, version))
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
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        last_ping = 0.0
        try:
            while not self._closing:
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
                if sock in events:
                    for _ in range(1024):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(sock, frames)
                now = time.monotonic()
                self._on_timers(sock, now)
                if self._pending and now - last_ping >= self.ping_interval:
                    last_ping = now
                    self._try_send(sock, client_frames(MMI_PING, [pack({})]))
        finally:
            for p in self._pending.values():
                if not p.future.done():
                    p.future.set_exception(RingserveError("client closed before an answer arrived", p.rid))
            sock.close(linger=0)

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
            if now >= p.deadline:
                del self._pending[p.rid]
                p.future.set_exception(Timeout("no answer from the master before the deadline", p.rid))
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
        self._observe_epoch(sock, header.get("epoch"))
        rid = header.get("id")
        p = self._pending.get(rid)
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
            p.future.set_result(Reply(rid, outputs, header.get("version"), header.get("worker"), header))
        else:
            p.future.set_exception(from_error(header.get("error"), rid))

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
