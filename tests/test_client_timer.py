"""Issue 22, fifth round: AsyncClient's timer sleeps until the books need it.

It used to wake every 10 ms whatever was pending; now it sleeps until `Reliability.next_due` (a
deadline, a resend, a ping, the sweep for cancelled futures) or IDLE_WAKE_S. What that must keep:
a short deadline among long ones fires on time, an unanswered request is sent again asking for an
ACK, a cancelled one leaves the books, and answers that arrive meanwhile resolve at once. The wakes
are counted (not timed): a count is what the change is about and it holds on a loaded machine.
A ROUTER thread stands in for the master (it answers pings; requests only when told to).
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import zmq

from ringserve.client import AsyncClient, Timeout
from ringserve.client.aio import IDLE_WAKE_S
from ringserve.client.reliable import CANCEL_SWEEP_S, TIMER_STEP_S
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.envelope import split_batch_packed
from ringserve.protocol.messages import MDP_CLIENT

pytestmark = pytest.mark.timeout(60)
X = {"x": np.ones((1, 2), np.float32)}


class QuietMaster:
    """Answers pings; keeps every request header it saw; answers a request (an empty result) only
    when its id is in `answer_ids`."""

    def __init__(self, ctx: zmq.Context):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.seen: list[dict] = []
        self.answer_ids: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(20):
                continue
            ident, _, _, service, *body = self.sock.recv_multipart()
            if service == b"mmi.ping":
                self.sock.send_multipart([ident, b"", MDP_CLIENT, service, pack({"ok": True, "epoch": "e1"})])
                continue
            if service == b"mmi.batch2":
                headers = [h for _, _, h, _ in split_batch_packed(body)[0]]
            else:
                headers = [unpack_map(body[0])]
            self.seen.extend(headers)
            for h in headers:
                if h["id"] in self.answer_ids:
                    self.sock.send_multipart([ident, b"", MDP_CLIENT, b"m", pack(
                        {"id": h["id"], "ok": True, "epoch": "e1", "outputs": []})])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(linger=0)


def counting_timer(c: AsyncClient) -> list:
    """Wrap the client's timer callback (before it is first scheduled) so that its wakes are counted."""
    wakes: list = []
    real = c._on_timer

    def on_timer() -> None:
        wakes.append(1)
        real()
    c._on_timer = on_timer  # the loop is given the instance's attribute each time the timer is armed
    return wakes


def test_the_timer_sleeps_until_something_is_due_and_every_rule_still_holds(zctx):
    master = QuietMaster(zctx)

    async def main() -> None:
        c = AsyncClient(master.address, timeout=30, grace=0.1, retry_interval=1.0)
        wakes = counting_timer(c)
        async with c:
            master.answer_ids.add("fast")
            long = [c.submit("m", X) for _ in range(8)]  # first resends at +1 s, deadlines at +30 s
            await asyncio.sleep(0.05)
            gone = c.submit("m", X, request_id="gone")
            short = c.submit("m", X, timeout=0.3)  # its deadline is long before anything else's
            fast = c.submit("m", X, request_id="fast")
            assert (await asyncio.wait_for(fast, 5)).id == "fast"  # answers do not wait for the timer
            gone.cancel()
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(Timeout):
                await asyncio.wait_for(short, 5)
            took = asyncio.get_running_loop().time() - t0
            assert took < 0.4 + 10 * TIMER_STEP_S, took  # 0.3 s + grace, not a sweep or a resend later
            await asyncio.wait_for(_until(lambda: "gone" not in c._rel.pending), 5 + CANCEL_SWEEP_S)
            await asyncio.wait_for(_until(lambda: any(h.get("ack") for h in master.seen)), 5)  # resent, asking
            assert not any(f.done() for f in long)
            assert sum(h["id"] == "gone" for h in master.seen) == 1  # cancelled before its resend: never again
            # ~1.3 s with requests pending: the old 10 ms tick woke >= 100 times; now the sweep, pings,
            # deadlines and resends, each at most every CANCEL_SWEEP_S (plus a few early wakes)
            assert len(wakes) <= 1.3 / CANCEL_SWEEP_S * 2 + 10, len(wakes)
            for f in long:
                f.cancel()
            await asyncio.wait_for(_until(lambda: not c._rel.pending), 5)
            idle0 = len(wakes)
            await asyncio.sleep(1.0)
            assert len(wakes) - idle0 <= 1.0 / IDLE_WAKE_S + 2, len(wakes) - idle0  # idle: a wake per IDLE_WAKE_S
            master.answer_ids.add("after-idle")
            late = c.submit("m", X, request_id="after-idle")  # the timer is re-armed for the new request
            assert (await asyncio.wait_for(late, 5)).id == "after-idle"
            short2 = c.submit("m", X, timeout=0.2)  # re-armed from an idle sleep for a near deadline
            with pytest.raises(Timeout):
                await asyncio.wait_for(short2, 0.2 + 0.1 + IDLE_WAKE_S / 2)

    try:
        asyncio.run(main())
    finally:
        master.close()


async def _until(pred, step: float = 0.01) -> None:
    while not pred():
        await asyncio.sleep(step)


class EchoLaterMaster(QuietMaster):
    """Answers every request of a message in one message `delay` later (as a loaded master does:
    a round trip of some ms, every answer of the client's message together); counts pings."""

    def __init__(self, ctx: zmq.Context, delay: float = 0.01):
        self.delay, self.pings = delay, 0
        super().__init__(ctx)

    def run(self) -> None:
        import collections
        import time

        held: collections.deque = collections.deque()
        while not self.stop.is_set():
            wait = max(0.0, held[0][0] - time.monotonic()) if held else 0.02
            if self.sock.poll(int(wait * 1000) + 1):
                ident, _, _, service, *body = self.sock.recv_multipart()
                if service == b"mmi.ping":
                    self.pings += 1
                    self.sock.send_multipart([ident, b"", MDP_CLIENT, service, pack({"ok": True, "epoch": "e1"})])
                    continue
                headers = [h for _, _, h, _ in split_batch_packed(body)[0]] if service == b"mmi.batch2" \
                    else [unpack_map(body[0])]
                answers = [pack({"id": h["id"], "ok": True, "epoch": "e1", "outputs": []}) for h in headers]
                held.append((time.monotonic() + self.delay, ident, answers))
            while held and held[0][0] <= time.monotonic():
                _, ident, answers = held.popleft()
                for a in answers:
                    self.sock.send_multipart([ident, b"", MDP_CLIENT, b"m", a])


def test_reads_that_empty_the_books_do_not_run_the_timers_once_per_message(zctx):
    """16 in flight, every answer of a message together after 10 ms: each answered message empties
    the books until the done-callbacks submit again. The read ran the timers there with nothing
    pending (setting the timer IDLE_WAKE_S away, which the next submit moved back), and a run a
    little early did nothing, so the next read ran them again: about one run per message (~50 a
    second here). Now the read runs them once the books are full again, and what may run early
    (the sweep, the ping) does: about one run per CANCEL_SWEEP_S. Pings and the sweep still come."""
    master = EchoLaterMaster(zctx, 0.01)

    async def main() -> tuple[int, int, int]:
        async with AsyncClient(master.address, timeout=30, retry_interval=3600.0) as c:
            runs: list = []
            real = c._run_timers

            def run_timers(*early) -> None:
                runs.append(early)
                real(*early)
            c._run_timers = run_timers
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.5
            answered = 0
            done = loop.create_future()

            def submit() -> None:
                c.submit("m", X).add_done_callback(on_done)

            def on_done(f) -> None:
                nonlocal answered
                answered += 1
                if loop.time() < end:
                    submit()
                elif not c._rel.pending and not done.done():
                    done.set_result(None)

            for _ in range(16):
                submit()
            gone = c.submit("m", X, request_id="gone")  # never answered by the master: cancelled below
            gone.cancel()
            await asyncio.wait_for(done, 20)
            return len(runs), answered, master.pings

    try:
        runs, answered, pings = asyncio.run(main())
    finally:
        master.close()
    messages = answered / 16
    assert messages >= 10, messages  # the loop ran (even on a loaded machine: 10 ms a message)
    assert runs <= 1.5 / CANCEL_SWEEP_S * 2 + 10, (runs, messages)  # not one per message
    assert pings >= 1
