"""Issue 22, the client's CPU per request: what its cheaper paths must still guarantee.

An answer's tensors are checked on arrival and made into arrays only when read (client/reply.py);
a bad answer inside a shared message is dropped alone; the timers walk the books only when
something may be due, yet a short deadline among long ones still fires, a resend still goes out
asking for an ACK, and a cancelled request is never sent again. A test ROUTER stands in for the
master (packed answers, mmi.batch2), so only the client is under test.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest
import zmq

from ringserve.client import AsyncClient, Client, Timeout
from ringserve.client.reliable import CANCEL_SWEEP_S
from ringserve.client.reply import checked_arrays
from ringserve.launch.procs import wait_until
from ringserve.protocol.codec import check_tensors, decode_tensors, encode_tensors, pack, unpack_map
from ringserve.protocol.envelope import answers_frames, split_batch_packed
from ringserve.protocol.messages import MDP_CLIENT

pytestmark = pytest.mark.timeout(60)


class PackedMaster:
    """A ROUTER thread that reads mmi.batch2 (and plain requests) and answers as `answer(header)`
    says: the answers' bodies to send now (header frame, tensor frames), all in one packed message;
    every request header it saw is kept."""

    def __init__(self, ctx: zmq.Context, answer):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.answer, self.seen, self.stop = answer, [], threading.Event()
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
                entries, broken = split_batch_packed(body)
                assert broken is None
                headers = [h for _, _, h, _ in entries]
            else:
                headers = [unpack_map(body[0])]
            self.seen.extend(headers)
            bodies = [b for h in headers for b in self.answer(h)]
            if bodies:
                self.sock.send_multipart([ident, b"", MDP_CLIENT, b"mmi.batch2", *answers_frames(bodies, True)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(linger=0)


def result(header: dict, outputs: dict) -> list:
    meta, frames = encode_tensors(outputs)
    return [pack({"id": header["id"], "ok": True, "epoch": "e1", "version": 3, "worker": "w", "outputs": meta}),
            *frames]


def test_checked_arrays_equal_decode_tensors():
    """The lazy maker gives what decode_tensors gives, for every form a checked list may take."""
    rng = np.random.default_rng(1)
    cases = [{"a": rng.standard_normal((2, 3)).astype(np.float32)},
             {"big": rng.standard_normal((64, 256)).astype(np.float64), "small": np.arange(3, dtype=np.int8)},
             {"empty": np.zeros((0, 4), np.float32), "flag": np.array([True, False])},
             {"s": np.array([b"ab", b"c"], dtype=object), "n": np.arange(4, dtype=np.int64).reshape(2, 2)}]
    for tensors in cases:
        meta, frames = encode_tensors(tensors)
        check_tensors(meta, frames)
        got, want = checked_arrays(meta, frames), decode_tensors(meta, frames)
        assert list(got) == list(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            assert got[name].tolist() == want[name].tolist()


def test_a_lying_answer_in_a_packed_message_is_dropped_alone_and_outputs_read_right(zctx):
    """Four answers in one mmi.batch2 message; the third lies about its tensor's size: the other
    three resolve with the right arrays (an inline one, an out-of-line one, strings), the liar's
    request stays unanswered and times out, as it did when answers were decoded on arrival."""
    big = np.arange(8192, dtype=np.float32).reshape(2, 4096)  # out of line: its own frame

    def answer(h):
        i = int(h["id"].rsplit("-", 1)[1])
        if i == 0:
            return [result(h, {"y": np.full((1, 3), 7.0, np.float32)})]
        if i == 1:
            return [result(h, {"y": big})]
        if i == 2:
            return [[pack({"id": h["id"], "ok": True, "epoch": "e1", "outputs": [["y", "float32", [4], b"\0" * 3]]})]]
        return [result(h, {"s": np.array([b"x", b"yz"], dtype=object)})]

    master = PackedMaster(zctx, answer)

    async def main():
        async with AsyncClient(master.address, timeout=1.0, grace=0.2, retry_interval=5.0) as c:
            futs = [c.submit("m", {"x": np.ones((1, 2), np.float32)}, request_id=f"r-{i}") for i in range(4)]
            done = await asyncio.gather(*futs, return_exceptions=True)
            return done, c.stats.batches_received

    try:
        (r0, r1, r2, r3), batches = asyncio.run(main())
    finally:
        master.close()
    assert batches >= 1
    assert r0.outputs["y"].tolist() == [[7.0, 7.0, 7.0]] and r0.version == 3 and r0.worker == "w"
    assert r1.outputs["y"].shape == (2, 4096) and np.array_equal(r1.outputs["y"], big)
    assert r1.outputs is r1.outputs  # made once, kept
    assert isinstance(r2, Timeout)
    assert r3.outputs["s"].tolist() == [b"x", b"yz"]


def test_a_short_deadline_among_long_ones_fires_on_time_and_resends_ask_for_an_ack(zctx):
    """The timers walk the books only when something may be due: a request with a short deadline
    sent after long ones (whose first resend is later than its deadline) still times out within its
    bounds, and an unanswered one is sent again, asking for an ACK, after its retry interval."""
    master = PackedMaster(zctx, lambda h: [])  # never answers
    try:
        with Client(master.address, timeout=30, grace=0.1, retry_interval=1.0) as c:  # first resends at +1 s
            long = [c.infer_async("m", {"x": np.ones((1, 2), np.float32)}) for _ in range(8)]
            time.sleep(0.05)
            t0 = time.monotonic()
            short = c.infer_async("m", {"x": np.ones((1, 2), np.float32)}, timeout=0.3)
            with pytest.raises(Timeout):
                short.result(timeout=5)
            took = time.monotonic() - t0
            assert 0.3 <= took < 3.0, took
            wait_until(lambda: any(h.get("ack") for h in list(master.seen)), 5, what="a resend asking for an ACK")
            assert not any(f.done() for f in long)
    finally:
        master.close()


def test_a_cancelled_request_leaves_the_books_and_is_never_sent_again(zctx):
    master = PackedMaster(zctx, lambda h: [])
    try:
        with Client(master.address, timeout=30, retry_interval=0.2, max_retry_interval=0.2) as c:
            fut = c.infer_async("m", {"x": np.ones((1, 2), np.float32)}, request_id="gone")
            wait_until(lambda: any(h["id"] == "gone" for h in list(master.seen)), 5, what="the first send")
            assert fut.cancel()
            wait_until(lambda: "gone" not in c._pending, 5 + CANCEL_SWEEP_S, what="the cancelled request to leave the books")
            sent = sum(h["id"] == "gone" for h in list(master.seen))
            time.sleep(0.6)  # three retry intervals
            assert sum(h["id"] == "gone" for h in list(master.seen)) == sent
            again = c.infer_async("m", {"x": np.ones((1, 2), np.float32)}, request_id="gone")  # the id is free again
            again.cancel()
    finally:
        master.close()


def test_many_in_flight_through_packed_messages_each_answered_once(zctx):
    """AsyncClient with 64 in flight for 2,000 requests, answers in shuffled packed messages: each
    future gets its own answer exactly once, nothing is resent. The retry interval is past the
    deadline, so a resend cannot happen however long a loaded machine stalls the process (it did, past
    the default 0.5 s): `resent == 0` then means no request needed one, and an answer lost or given
    to the wrong future still fails the test (a Timeout, or a wrong value), not hidden by a resend."""
    rng = random.Random(3)
    held: list = []

    def answer(h):
        held.append(h)
        if len(held) < 5 and rng.random() < 0.7:
            return []  # hold some back: they go out with a later message, out of order
        out = [result(x, {"y": np.full((1,), float(x["id"].rsplit("-", 1)[1]), np.float32)}) for x in held]
        held.clear()
        rng.shuffle(out)
        return out

    master = PackedMaster(zctx, answer)

    async def main():
        async with AsyncClient(master.address, timeout=20, retry_interval=3600.0) as c:
            got: dict[str, float] = {}
            sem = asyncio.Semaphore(64)

            async def one(i: int):
                async with sem:
                    r = await c.infer_reply("m", {"x": np.ones((1, 2), np.float32)})
                    got[r.id] = float(r.outputs["y"][0])

            await asyncio.gather(*(one(i) for i in range(2000)))
            return got, c.stats

    try:
        got, stats = asyncio.run(main())
    finally:
        master.close()
    assert len(got) == 2000
    assert all(v == float(rid.rsplit("-", 1)[1]) for rid, v in got.items())
    assert stats.resent == 0 and stats.batches_sent > 0
