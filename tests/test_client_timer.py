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
