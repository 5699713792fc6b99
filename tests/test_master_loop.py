"""The master loop's fixed costs (issue 22, fifth round): a drain that ends on ZMQ_EVENTS, timers
that run only when due, a cache hit that skips what a miss needs. Real Broker, real sockets on
loopback (the `broker` fixture), pumped by hand."""
from __future__ import annotations

import time

import pytest
import zmq

from ringserve.master import liveness
from ringserve.master.window import ModelWindow
from ringserve.protocol.codec import pack, unpack, unpack_map
from ringserve.protocol.envelope import batch_frames_packed
from ringserve.protocol.messages import DISCONNECT, HEARTBEAT
from ringserve.protocol.sockets import drain
from tests.test_master_robustness import X, answer, dealer, next_request, recv, register, reply_ok, request

pytestmark = pytest.mark.timeout(60)


def test_drain_stops_at_its_limit_and_says_more_wait_then_empties_without_raising():
    ctx = zmq.Context()
    try:
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        for s in (pull, push):
            s.setsockopt(zmq.LINGER, 0)
        # inproc: a send lands in the reader's pipe at once, so all three wait before the first
        # drain (over tcp one could still be in flight and the limit case never be seen)
        pull.bind("inproc://drain-limit")
        push.connect("inproc://drain-limit")
        for i in range(3):
            push.send_multipart([b"m%d" % i, b"tail"])
        assert pull.poll(5000)
        deadline = time.monotonic() + 5
        while pull.getsockopt(zmq.EVENTS) & zmq.POLLIN and time.monotonic() < deadline:
            got: list = []
            if drain(pull, got.append, 2):  # the limit: more may wait
                assert [f.bytes for f in got[0]] == [b"m0", b"tail"] and len(got) == 2
                break
        got = []
        while not got and time.monotonic() < deadline:
            pull.poll(100)
            assert drain(pull, got.append, 5) is False  # what waited is read, then EVENTS says empty
        assert [f[0].bytes for f in got] == [b"m2"]

        def boom(_frames):
            raise RuntimeError("a handler bug")
        push.send(b"x")
        assert pull.poll(5000)
        assert drain(pull, boom, 4) is False  # logged, the drain goes on and ends
        assert drain(pull, boom, 4) is False  # nothing waits: the first read's zmq.Again ends it quietly
    finally:
        ctx.destroy(linger=0)


def test_a_silent_worker_is_evicted_when_due_and_not_before(broker):
    b = broker
    w = register(b, b"w1")
    (rec,) = b.workers.values()
    expiry = liveness.expiry(b.cfg.heartbeat_interval, b.cfg.heartbeat_liveness)
    b.on_tick(rec.last_seen + expiry / 2)
    assert b.workers and b._next_liveness >= rec.last_seen + expiry  # the next check waits for its due time
    b.on_tick(rec.last_seen + expiry + 0.01)
    assert not b.workers  # due: evicted and told
    kinds = [recv(b, w)[1] for _ in range(3)]  # each tick's clock also made a heartbeat due
    assert kinds == [HEARTBEAT, HEARTBEAT, DISCONNECT]


def test_a_request_and_its_result_still_take_one_turn_each_way(broker):
    b = broker
    w = register(b, b"w1")
    c = dealer(b, "frontend")
    request(c, "r1")
    reply_ok(w, next_request(b, w))
    out = answer(recv(b, c))
    assert out["id"] == "r1" and out["ok"] is True
    assert b.books()["ok"] and not b.pending


def _cached_answer(b, rid: str):
    """A worker serving a cacheable "mlp" (credit 1) and a client whose request `rid` was answered by it,
    so its answer is in the response cache; returns the client."""
    models = {"mlp": {"version": 1, "ready": True, "dtype": "float32", "quantize": None, "device": "cpu",
                      "cache": True}}
    w = register(b, b"w1", credit=1, models=models)
    c = dealer(b, "frontend")
    request(c, rid)
    reply_ok(w, next_request(b, w))
    assert answer(recv(b, c))["ok"] is True  # kept in the response cache
    return c


def test_a_cache_hit_is_answered_even_when_the_queue_is_full(broker):
    """A hit needs no queue slot, deadline or worker: it is answered before the queue's room is
    looked at (a miss for the same model is still refused OVERLOADED)."""
    b = broker
    c = _cached_answer(b, "r1")
    b.queues.max_queue = 0  # every queue is full from now on
    request(c, "r2")
    hit = answer(recv(b, c))
    assert hit["id"] == "r2" and hit["ok"] is True and hit.get("cached") is True
    c.send_multipart([b"", b"MDPC01", b"mlp", pack({"id": "r3", "inputs": [["x", "float32", [1, 1], b"\0" * 4]]})])
    miss = answer(recv(b, c))
    assert miss["id"] == "r3" and miss["error"]["code"] == "OVERLOADED"
    assert b.books()["ok"]


def test_the_hits_of_one_batch_are_each_answered_once_and_each_counted_in_the_metrics(broker):
    """A message's cache hits observe their answer metrics together at its end (once per model and
    version): every hit still counted as one "ok" answer and one request duration, a lone request's
    hit as before, and each answered once under its own id."""
    b = broker
    c = _cached_answer(b, "r0")
    local = b.metrics.local
    before = local.answers.get(("mlp", 1, "ok"), 0)
    durations = sum(local.request_duration["mlp"].counts)
    reqs = [(b"mlp", [pack({"id": f"h{i}", "inputs": [["x", "float32", [1, 4]]]}), X.tobytes()]) for i in range(5)]
    c.send_multipart([b"", b"MDPC01", b"mmi.batch2", *batch_frames_packed(reqs)])
    answers: list[dict] = []
    while len(answers) < 5:
        frames = recv(b, c)
        assert frames[2] == b"mmi.batch2"
        answers.extend(unpack_map(h) for h in unpack(frames[3]))
    assert sorted(a["id"] for a in answers) == [f"h{i}" for i in range(5)]
    assert all(a["ok"] and a.get("cached") is True for a in answers)
    assert b._batch_hits is None  # nothing left over for the next message
    assert local.answers[("mlp", 1, "ok")] == before + 5
    assert sum(local.request_duration["mlp"].counts) == durations + 5
    alone = dealer(b, "frontend")  # a client that never batched: its answer comes alone
    request(alone, "alone")
    assert answer(recv(b, alone)).get("cached") is True
    assert local.answers[("mlp", 1, "ok")] == before + 6 and b.responses.hits == 6
    assert b.books()["ok"]


def test_record_all_is_record_for_each_latency():
    one, many = ModelWindow(), ModelWindow()
    now = 1000.25
    for lat in (0.001, 0.002, 0.003):
        one.record(now, lat)
    many.record_all(now, [0.001, 0.002, 0.003])
    assert (one.lat, one.at, one.n, one.counts, one.seconds, one.first) == \
        (many.lat, many.at, many.n, many.counts, many.seconds, many.first)
    assert one.summary(now + 0.1) == many.summary(now + 0.1)


def test_without_keys_the_scope_is_the_peer_address(broker):
    from ringserve.master.broker import client_scope
    ctx = broker.ctx
    c = dealer(broker, "frontend")
    c.send_multipart([b"", b"MDPC01", b"mmi.ping", b""])
    frames = []
    deadline = time.monotonic() + 5
    while not frames and time.monotonic() < deadline:
        if broker.frontend.poll(100):
            frames = broker.frontend.recv_multipart(copy=False)
    assert frames and client_scope(frames[-1], secure=False) == client_scope(frames[-1]) == "addr:127.0.0.1"
    assert ctx is broker.ctx and unpack_map is not None


def test_a_batch_admits_each_request_as_alone_duplicates_acks_and_pins_included(broker):
    """on_batch's plain admission (served model, no route, new id, unpinned) keeps on_request's books:
    each request counted once, a duplicate id inside the message held once, an ACK where asked, a
    pinned request through on_request; every one dispatched once and answered once."""
    b = broker
    w = register(b, b"w1", credit=8)
    c = dealer(b, "frontend")

    def body(rid, **fields):
        return [pack({"id": rid, "inputs": [["x", "float32", [1, 4]]], **fields}), X.tobytes()]
    reqs = [(b"mlp", body("r1")), (b"mlp", body("r1")), (b"mlp", body("r2", ack=True)),
            (b"mlp", body("r3", version=1)), (b"mlp", body("r4", timeout_ms=1e15))]
    c.send_multipart([b"", b"MDPC01", b"mmi.batch2", *batch_frames_packed(reqs)])
    got = sorted((next_request(b, w) for _ in range(4)), key=lambda d: d["id"])
    assert [d["id"] for d in got] == ["r1", "r2", "r3", "r4"]
    assert b.counters["mlp"].requests == 4 and len(b.pending) == 4 and len(b.held) == 4
    # capped as alone; `deadline - received` is (t + 60) - t in floats: 60 + 4.5e-13 when the monotonic clock t
    # lies within 60 s below a power of two (t + 60 has the coarser spacing), so a nanosecond of slack
    assert max(r.deadline - r.received for r in b.pending.values()) <= b.cfg.max_timeout + 1e-9
    for d in got:
        reply_ok(w, d)
    answers: list[dict] = []
    while len(answers) < 5:  # the ACK of r2, then four results (one message or several)
        frames = recv(b, c)
        assert frames[2] == b"mmi.batch2"
        answers.extend(unpack_map(h) for h in unpack(frames[3]))
    assert answers[0] == {"id": "r2", "ack": True, "epoch": b.epoch}
    assert sorted(a["id"] for a in answers[1:]) == ["r1", "r2", "r3", "r4"] and all(a["ok"] for a in answers[1:])
    assert b.books()["ok"] and not b.pending and not b.held and b.counters["mlp"].ok == 4
