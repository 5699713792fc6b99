"""AsyncClient(address): the client for callers that live in an asyncio loop, with no thread.

The sync ``Client`` hands each request to an I/O thread (a deque, a wake-up pipe, a Future
resolved across threads); under load that hand-over, and the GIL passing between the two
threads, cost more CPU than the request itself. Here the loop's own thread owns the DEALER:
``submit`` encodes and sends at once, and the socket's file descriptor is watched with
``loop.add_reader``, so a reply resolves its asyncio Future in the same thread. The
reliability rules (resends asking for an ACK, epochs, pings, reconnects, deadlines) are the
same ``client.reliable.Reliability`` the sync client uses.

A ZeroMQ socket's descriptor signals edges, not levels: after any send the socket may hold
messages that raised no new edge, so every turn that sent asks the socket (ZMQ_EVENTS) whether a
message waits, and reads it if so; a turn ends only once the socket said it had nothing more, which
is what re-arms the descriptor. (Asking costs a syscall here, as a recv that fails does; a failed
recv also raises, so reads stop on the socket's answer, not on zmq.Again.)

The loop is woken as little as the rules allow, because a wake-up after a sleep costs far more CPU
than the work it does: a read that answered requests asks for the next turn itself (it runs right
after the callbacks the answers queued, and sends what they submitted in one message); the timer
sleeps until the books next need it (``Reliability.next_due``), and a read that finds it nearly due
runs it in the same turn, so under load the timer never wakes the loop on its own. Such a read runs
it only with requests in the books (one that answered them all leaves it to the turn after, once the
done-callbacks have submitted again), and what may run early then does (the sweep, the ping), so the
timers run about once per sweep, not once per message.

    async with AsyncClient("tcp://master:5555") as c:
        outputs = await c.infer("mlp", {"x": x})
"""
from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any, Mapping

import numpy as np
import structlog
import zmq

from ringserve.client.errors import RingserveError, Timeout
from ringserve.client.reliable import (
    EVENTS, POLLIN, TIMER_STEP_S, ClientStats, Reliability, Reply, first_master, master_addresses, new_pending, open_dealer,
)
from ringserve.protocol.security import Security

log = structlog.get_logger("ringserve.client")

MAX_READ_PER_CALL = 1024  # messages read per wake-up before the loop gets a turn
# The timer sleeps until `Reliability.next_due` (a deadline, a resend, a ping, the sweep for cancelled
# futures: at most CANCEL_SWEEP_S apart while requests wait), and at most IDLE_WAKE_S with none.
# It used to wake every TIMER_STEP_S (100 times a second): under load that was one more wake-up per
# answered message, and a wake-up after a sleep costs far more CPU than the work it does (cold
# caches): measured 45.6 against 60.8 us per request with answers 10 ms apart (bench/client_loop.py).
IDLE_WAKE_S = 0.5
# A read finding the timer due within this runs the timers itself and moves the timer on: under load
# (a message every few ms) the timer then never wakes the loop on its own. Early is harmless: every
# rule compares with the real time (a deadline not reached yet is left for later, a ping or a sweep
# a little early changes nothing).
EARLY_TIMERS_S = 0.02
# The timer's own look at the monitor socket, at most this often (and at the first): its reader
# sees events as they come, so the look only catches an edge that came before the reader was added.
# Done every 10 ms tick it cost more than the rest of the tick (a recv that finds nothing raises, and
# libzmq checks its commands first): measured 9 us per request at 1,000 requests/s in the gateway.
MONITOR_LOOK_S = 0.1


class AsyncClient:
    def __init__(self, address: str, timeout: float = 30.0, retry_interval: float = 0.5,
                 max_retry_interval: float = 4.0, ping_interval: float = 0.5, grace: float = 1.0,
                 hwm: int = 100_000, security: Security | None = None, failover_after: float = 0.6,
                 batch_max: int = 256, batch_bytes: int = 4 << 20):
        endpoints = master_addresses(address)  # one master, or several (active-active): ConfigError if none
        current = first_master(endpoints)
        self.address, self.timeout, self.grace, self.retry_interval = address, timeout, grace, retry_interval
        security = security or Security()
        self._rel = Reliability(retry_interval, max_retry_interval, ping_interval, address=address, endpoints=endpoints, current=current,
                                failover_after=failover_after, batch_max=batch_max, batch_bytes=batch_bytes,
                                curve=security.enabled)
        self.stats: ClientStats = self._rel.stats
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._ctx = zmq.Context()
        # Plain sockets: only this loop's thread touches them. Unusable keys or address: ConfigError, here.
        try:
            self._sock, self._monitor = open_dealer(self._ctx, endpoints[current], hwm, security)
        except BaseException:
            self._ctx.term()
            raise
        self._loop: asyncio.AbstractEventLoop | None = None
        self._read_scheduled = False
        self._read_since_tick = False  # _on_readable ran since the last tick
        self._monitor_at = 0.0  # the timer's next look at the monitor socket (time.monotonic)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")  # when the timer fires (time.monotonic)
        self._closed = False

    @property
    def master(self) -> str:
        """The master this client is on now (with several, the one it last failed over to)."""
        return self._rel.address

    @property
    def epoch(self) -> str | None:
        return self._rel.epoch

    # ------------------------------------------------------------ public API
    def submit(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
               version: int | None = None, request_id: str | None = None,
               tags: Mapping[str, str] | None = None) -> asyncio.Future:
        """Send now; the Future resolves to a Reply or raises a RingserveError subclass.
        Must be called from the loop's thread."""
        if self._closed:
            raise RuntimeError("client is closed")
        if self._loop is None:
            self._attach()
        timeout = self.timeout if timeout is None else timeout
        rid = request_id or f"{self._prefix}-{next(self._ids)}"
        if rid in self._rel.pending:
            raise ValueError(f"request id {rid!r} is already in flight on this client; use a new id")
        fut = self._loop.create_future()
        p = new_pending(rid, model, inputs, timeout, self.grace, self.retry_interval, version, tags, fut)
        rel = self._rel
        idle = not rel.pending  # the first request in flight: a ping and the failover clock are due now
        rel.start(self._sock, p)
        if idle or p.deadline < self._timer_at or p.next_retry < self._timer_at:  # rare under load
            self._arm_timer()
        self._schedule_read()
        return fut

    async def infer_reply(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
                          version: int | None = None, tags: Mapping[str, str] | None = None) -> Reply:
        timeout = self.timeout if timeout is None else timeout
        fut = self.submit(model, inputs, timeout, version, tags=tags)
        try:  # the timers fail it at its deadline; this bound holds even if they could not run
            return await asyncio.wait_for(asyncio.shield(fut), timeout + self.grace + 1.0)
        except asyncio.TimeoutError:
            fut.cancel()
            raise Timeout(self._rel.timeout_message()) from None

    async def infer(self, model: str, inputs: Mapping[str, Any], timeout: float | None = None,
                    version: int | None = None, tags: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """Run `model` on named inputs; return numpy outputs (raises a RingserveError subclass)."""
        return (await self.infer_reply(model, inputs, timeout, version, tags)).outputs

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            for fd in (self._sock.getsockopt(zmq.FD), self._monitor.getsockopt(zmq.FD)):
                self._loop.remove_reader(fd)
        if self._timer is not None:
            self._timer.cancel()
        self._rel.fail_all("client closed before an answer arrived")
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()

    async def __aenter__(self) -> "AsyncClient":
        self._attach()
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- the loop
    def _attach(self) -> None:
        """Bind to the running loop on first use (readers on both descriptors, the timer)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.getsockopt(zmq.FD), self._on_descriptor)
        self._loop.add_reader(self._monitor.getsockopt(zmq.FD), self._on_monitor)
        self._arm_timer(time.monotonic())
        self._schedule_read()

    def _arm_timer(self, at: float | None = None) -> None:
        """(Re)set the timer for `at`, or for when the books next need it: at the latest IDLE_WAKE_S
        from now, so the missed-edge read and the monitor look still come with nothing pending."""
        now = time.monotonic()
        if at is None:
            at = self._rel.next_due(now)
        at = min(at, now + IDLE_WAKE_S)
        if self._timer is not None:
            if at >= self._timer_at:
                return  # it fires first already
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, at - now), self._on_timer)

    def _schedule_read(self) -> None:
        if not self._read_scheduled:
            self._read_scheduled = True
            self._loop.call_soon(self._on_readable)

    def _on_descriptor(self) -> None:
        """The socket's descriptor fired: a message most likely waits, so the first recv is tried at once."""
        self._on_readable(False)

    def _on_readable(self, probe: bool = True) -> None:
        """Send what this turn queued, then read until the socket says it holds nothing more."""
        self._read_scheduled = False
        self._read_since_tick = True
        if self._closed:
            return
        rel, sock = self._rel, self._sock
        rel.flush(sock)  # what submit() queued since the last turn: one message
        waiting = len(rel.pending)
        more = rel.read_messages(sock, MAX_READ_PER_CALL, probe)  # True: more may be waiting
        if not more and rel.outgoing:  # the answers caused resends (an epoch change, a 501)
            rel.flush(sock)
            more = sock.getsockopt(EVENTS) & POLLIN  # the send may have taken the edge: ask
        if more or len(rel.pending) < waiting:
            # Answered futures queued their callbacks just now, so this next turn runs after them, in
            # the same pass of the loop, and sends what they submitted in one message; without it
            # the first submit asked for a turn of its own: one more pass (an epoll) per message.
            self._schedule_read()
        # The loop is awake anyway: no wake of its own. Not while the books are empty: a read that
        # answered every request in flight (32 answers in a message, 32 in flight) would run them
        # with nothing to do and set the timer for IDLE_WAKE_S, and the next turn's submits would
        # move it back: runs the turn after, once the done-callbacks have submitted again.
        if rel.pending and self._timer_at - EARLY_TIMERS_S <= time.monotonic():
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = None, float("inf")
            self._run_timers(EARLY_TIMERS_S)

    def _on_monitor(self) -> None:
        if self._closed:
            return
        if self._rel.read_monitor(self._sock, self._monitor):
            self._rel.flush(self._sock)
            self._schedule_read()  # everything unanswered was sent again: the edge may have been consumed

    def _on_timer(self) -> None:
        if self._closed:
            return
        self._timer, self._timer_at = None, float("inf")
        self._run_timers()

    def _run_timers(self, early: float = 0.0) -> None:
        """Deadlines, resends, pings, failover, the monitor's look; then the timer is set for the next.
        `early`: run by a read, ahead of the timer: what may run early does (Reliability.on_timers)."""
        sends, pinged = self.stats.sent, self._rel.last_ping
        now = time.monotonic()
        try:
            if now + early >= self._monitor_at:
                self._monitor_at = now + MONITOR_LOOK_S
                self._on_monitor()  # its descriptor's edge may have come (and gone) before a reader was added
            self._rel.on_timers(self._sock, now, early)
            self._rel.flush(self._sock)
        except Exception:
            self.stats.loop_errors += 1
            log.exception("client_timer_error")
        if self.stats.sent != sends or self._rel.last_ping != pinged or not self._read_since_tick:
            self._schedule_read()  # pings or resends went out; or no read since the last wake: a missed edge is caught here
        self._read_since_tick = False
        try:
            self._arm_timer()
        except Exception:  # the books could not say: wake at the old pace rather than never
            self.stats.loop_errors += 1
            log.exception("client_timer_error")
            self._timer_at = now + TIMER_STEP_S
            self._timer = self._loop.call_later(TIMER_STEP_S, self._on_timer)


__all__ = ["AsyncClient", "Reply", "RingserveError"]
