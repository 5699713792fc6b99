"""No peer, client or network blip can crash, stall or starve the master (issue 10, items 1-8).

Most tests drive a real Broker in this process: its three ROUTER sockets on ephemeral ports,
DEALERs from the test as clients and workers, and `pump` in place of `Broker.run` so every
step is deterministic. The pure parts (validators, cache, queues, flags) are tested alone.
"""
from __future__ import annotations

import argparse
import math
import signal
import time

import numpy as np
import pytest
import zmq

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.launch.master import parser as master_parser
from ringserve.launch.procs import wait_until
from ringserve.master.broker import Broker
from ringserve.master.registry import AnsweredCache, ModelQueues, PendingRequest
from ringserve.master.scheduler import Load, make_policy
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.envelope import parse_dispatch, parse_heartbeat, parse_ready, parse_worker_reply
from ringserve.protocol.messages import (
    DISCONNECT, HEARTBEAT, READY, REPLY, REQUEST, WORKER_PROTO, ProtocolError,
)

pytestmark = pytest.mark.timeout(120)

EP = "tcp://127.0.0.1:*"
X = np.ones((1, 4), np.float32)
GOOD_MODELS = {"mlp": {"version": 1, "ready": True, "dtype": "float32", "quantize": None, "device": "cpu"}}


# --------------------------------------------------------------------------- harness
def pump(b: Broker, until=None, timeout: float = 5.0):
    """Run the broker's loop by hand until `until()` is truthy (bounded in time); return its value."""
    end = time.monotonic() + timeout
    while True:
        b.turn(20)
        value = until() if until else None
        if value or time.monotonic() >= end:
            if until is not None and not value:
                raise TimeoutError("condition not reached")
            return value


def dealer(b: Broker, which: str, ident: bytes | None = None) -> zmq.Socket:
    s = b.ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if ident:
        s.setsockopt(zmq.ROUTING_ID, ident)
    s.connect(b.endpoints[which])
    return s


def recv(b: Broker, sock: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
    """Pump the broker until `sock` has a message; return its frames."""
    got: list = []

    def ready():
        if sock.poll(0):
            got.append(sock.recv_multipart())
        return got

    pump(b, ready, timeout)
    return got[0]


def silent(b: Broker, sock: zmq.Socket, wait: float = 0.3) -> bool:
    """True when nothing arrives on `sock` while the broker runs for `wait` seconds."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        pump(b, timeout=0.02)
        if sock.poll(0):
            return False
    return True


def register(b: Broker, ident: bytes, credit: int = 4, models=None, **extra) -> zmq.Socket:
    w = dealer(b, "backend", ident)
    w.send_multipart([WORKER_PROTO, READY, pack({"name": ident.decode(), "models": models or GOOD_MODELS,
                                                 "credit": credit, **extra})])
    assert recv(b, w)[:2] == [WORKER_PROTO, HEARTBEAT]
    return w


def request(sock: zmq.Socket, rid: str, model: bytes = b"mlp", **fields) -> None:
    sock.send_multipart([b"", b"MDPC01", model, pack({"id": rid, "inputs": [["x", "float32", [1, 4]]], **fields}),
                         X.tobytes()])


_UNREAD: dict[int, list] = {}  # id(worker socket) -> requests of a REQUEST message not yet handed out


def next_request(b: Broker, w: zmq.Socket) -> dict:
    """The next request a fake worker got, as {"id", "attempt", "model", ...} (a REQUEST message
    may carry several)."""
    unread = _UNREAD.setdefault(id(w), [])
    if not unread:
        frames = recv(b, w)
        assert frames[:2] == [WORKER_PROTO, REQUEST], frames[:2]
        unread.extend(parse_dispatch(frames[2:]))
    d = unread.pop(0)
    return {**d.header, "id": d.cid, "key": d.key, "attempt": d.attempt, "model": d.model, "version": d.version,
            "timeout_ms": d.timeout_ms}


def reply_ok(w: zmq.Socket, hdr: dict) -> None:
    w.send_multipart([WORKER_PROTO, REPLY, pack({"id": hdr["id"], "key": hdr["key"], "attempt": hdr["attempt"],
                                                 "ok": True, "version": hdr["version"] or 1,
                                                 "outputs": [["y", "float32", [1, 4]]]}), X.tobytes()])


def answer(frames: list[bytes]) -> dict:
    assert frames[:2] == [b"", b"MDPC01"], frames[:2]
    return unpack_map(frames[3])


# ---------------------------------------------------------------- item 1: peer data
@pytest.mark.parametrize("info,msg", [
    ({"models": {"mlp": 5}}, "must be a map"),
    ({"models": {b"mlp": {}}}, "models key"),
    ({"models": {}}, "1..256"),
    ({"models": GOOD_MODELS, "credit": "8"}, "credit"),
    ({"models": GOOD_MODELS, "credit": True}, "credit"),
    ({"models": GOOD_MODELS, "credit": 0}, "credit"),
    ({"models": GOOD_MODELS, "credit": 10**12}, "credit"),
    ({"models": GOOD_MODELS, "weight": math.nan}, "weight"),
    ({"models": GOOD_MODELS, "weight": math.inf}, "weight"),
    ({"models": GOOD_MODELS, "weight": 0}, "weight"),
    ({"models": GOOD_MODELS, "weight": "1"}, "weight"),
    ({"models": {"mlp": {"version": "1"}}}, "version"),
    ({"models": {"mlp": {"ready": "yes"}}}, "ready"),
    ({"models": GOOD_MODELS, "name": ["w"]}, "name"),
    ([1, 2], "map"),
])
def test_ready_validation_refuses_bad_fields(info, msg):
    with pytest.raises(ProtocolError, match=msg):
        parse_ready(info)


def test_ready_and_heartbeat_validation_return_clean_values():
    hello = parse_ready({"name": "w0", "models": {"mlp": {"version": 3, "extra": [1] * 100}}, "credit": 8,
                         "weight": 2, "device": "cpu", "pid": 42, "junk": {"x": 1}})
    assert (hello.name, hello.credit, hello.weight, hello.pid) == ("w0", 8, 2.0, 42)
    assert hello.models == {"mlp": {"version": 3, "ready": True, "dtype": None, "quantize": None, "device": None}}
    beat = parse_heartbeat({"models": GOOD_MODELS, "stats": {"batches": 3, "nested": {"a": 1}, 5: 1,
                                                              **{f"k{i}": i for i in range(500)}},
                            "draining": False})
    assert beat.models == GOOD_MODELS and "nested" not in beat.stats and len(beat.stats) <= 64
    with pytest.raises(ProtocolError, match="must be a map"):
        parse_heartbeat({"models": {"mlp": 5}})
    with pytest.raises(ProtocolError, match="draining"):
        parse_heartbeat({"draining": "yes"})


@pytest.mark.parametrize("header,frames,msg", [
    ({"ok": True}, [], "'key'"),
    ({"id": "r", "ok": True}, [], "attempt"),
    ({"id": "r", "attempt": 1}, [], "'ok'"),
    ({"id": "r", "attempt": 1, "ok": True, "outputs": [["y", "float32", [4]]]}, [b"\0" * 3], "bytes"),
    ({"id": "r", "attempt": 1, "ok": False, "error": "boom"}, [], "'error' map"),
    ({"id": ["r"], "attempt": 1, "ok": True}, [], "'key'"),
])
def test_worker_reply_validation(header, frames, msg):
    with pytest.raises(ProtocolError, match=msg):
        parse_worker_reply(header, frames)


def test_worker_reply_error_code_is_typed():
    r = parse_worker_reply({"id": "r", "attempt": 1, "ok": False, "error": {"code": "LOL", "message": 5}}, [])
    assert r.error_code == "INTERNAL" and r.header["error"] == {"code": "INTERNAL", "message": "no message"}


def test_weight_and_numeric_flags_are_validated_at_parse_time(capsys):
    p = master_parser()
    for bad in (["--weight", "w0=nan"], ["--weight", "w0=0"], ["--weight", "w0=-1"], ["--weight", "w0=inf"],
                ["--weight", "w0"], ["--heartbeat-interval", "0"], ["--heartbeat-interval", "nan"],
                ["--heartbeat-liveness", "0"], ["--max-queue", "-1"], ["--max-attempts", "0"],
                ["--default-timeout", "-5"], ["--max-timeout", "0"], ["--answer-cache-bytes", "0"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    args = p.parse_args(["--weight", "w0=2.5", "--max-timeout", "10"])
    assert args.weight == [("w0", 2.5)] and args.max_timeout == 10.0
    assert isinstance(master_parser(), argparse.ArgumentParser)


def test_weighted_random_survives_non_finite_weights():
    choose = make_policy("weighted-random", seed=3)
    loads = [Load(b"a", 0, 4, math.nan), Load(b"b", 0, 4, 1.0), Load(b"c", 0, 4, -2.0)]
    picks = {choose(loads) for _ in range(200)}
    assert picks and picks <= {b"a", b"b", b"c"} and b"b" in picks


def test_bad_ready_is_refused_and_eviction_of_a_real_worker_does_not_crash(broker):
    good = register(broker, b"good")
    bad = dealer(broker, "backend", b"bad")
    bad.send_multipart([WORKER_PROTO, READY, pack({"models": {"mlp": 5}, "credit": 4})])
    frames = recv(broker, bad)
    assert frames[:2] == [WORKER_PROTO, DISCONNECT] and unpack_map(frames[2])["error"]["code"] == "BAD_REQUEST"
    assert set(broker.workers) == {b"good"}
    broker.cfg.unavailable_grace = 0.5
    good.send_multipart([WORKER_PROTO, DISCONNECT, pack({"reason": "bye"})])
    pump(broker, lambda: not broker.workers)
    client = dealer(broker, "frontend")
    request(client, "after")
    # Served a moment ago: unavailable (queued, then the retryable WORKER_LOST), not unknown.
    assert answer(recv(broker, client))["error"]["code"] == "WORKER_LOST"
    request(client, "later")
    assert answer(recv(broker, client))["error"]["code"] == "UNKNOWN_MODEL"


def test_bad_heartbeat_disconnects_that_worker_and_requeues_its_work(broker):
    w1 = register(broker, b"w1", credit=1)
    client = dealer(broker, "frontend")
    request(client, "r1")
    assert next_request(broker, w1)["id"] == "r1"
    w2 = register(broker, b"w2", credit=1)
    w1.send_multipart([WORKER_PROTO, HEARTBEAT, pack({"models": {"mlp": 5}})])
    frames = recv(broker, w1)
    assert frames[:2] == [WORKER_PROTO, DISCONNECT] and unpack_map(frames[2])["error"]["code"] == "BAD_REQUEST"
    hdr = next_request(broker, w2)  # w1's work went to w2
    assert (hdr["id"], hdr["attempt"]) == ("r1", 2)
    reply_ok(w2, hdr)
    assert answer(recv(broker, client))["ok"] is True


def test_master_survives_bad_peer_when_a_real_worker_dies(cluster, zctx):
    """Item 1 on real processes: READY {"models": {"mlp": 5}} then a real worker's eviction."""
    cluster.start_master()
    cluster.start_workers(2, model="echo=ringserve.worker.demo:noop")
    fake = zctx.socket(zmq.DEALER)
    fake.setsockopt(zmq.LINGER, 0)
    fake.setsockopt(zmq.RCVTIMEO, 5000)
    fake.connect(cluster.master.info["backend"])
    fake.send_multipart([WORKER_PROTO, READY, pack({"models": {"echo": 5}, "credit": 4})])
    assert fake.recv_multipart()[:2] == [WORKER_PROTO, DISCONNECT]
    cluster.workers[0].signal(signal.SIGKILL)
    admin = AdminClient(cluster.admin)
    wait_until(lambda: len(admin.status()["workers"]) == 1, 10, 0.05, "eviction")
    with Client(cluster.frontend, timeout=10) as c:
        np.testing.assert_array_equal(c.infer("echo", {"x": X})["y"], X)
    assert cluster.master.alive()


# ---------------------------------------------------------- items 2, 4: who gets answers
def test_answer_goes_to_whoever_asked_last(broker):
    w = register(broker, b"w", credit=1)
    first, second, third = (dealer(broker, "frontend") for _ in range(3))
    request(first, "r1", ack=True)
    assert answer(recv(broker, first))["ack"] is True
    hdr = next_request(broker, w)
    request(second, "r1", ack=True)  # a retry from a new socket (Majordomo's client makes one per retry)
    assert answer(recv(broker, second))["ack"] is True
    reply_ok(w, hdr)
    got = answer(recv(broker, second))
    assert got["ok"] is True and got["id"] == "r1"
    assert silent(broker, first)
    request(third, "r1")  # answered already: the remembered answer goes to this socket, not the first
    assert answer(recv(broker, third))["ok"] is True
    assert silent(broker, w, 0.1)  # and it was not run twice


def test_a_resend_on_the_socket_that_got_the_answer_gets_only_an_ack(broker):
    """ZeroMQ delivers in order on one connection: the answer is already ahead of the ACK, so a
    resend asking for one must not produce a second answer there; another socket gets the answer."""
    w = register(broker, b"w")
    client, other = dealer(broker, "frontend"), dealer(broker, "frontend")
    request(client, "r1")
    reply_ok(w, next_request(broker, w))
    assert answer(recv(broker, client))["ok"] is True
    request(client, "r1", ack=True)
    assert answer(recv(broker, client)) == {"id": "r1", "ack": True, "epoch": broker.epoch}
    assert silent(broker, client, 0.1)
    request(other, "r1", ack=True)  # a reconnected client: a new routing id gets the answer itself
    assert answer(recv(broker, other))["ok"] is True
    assert silent(broker, w, 0.1)  # never run twice


@pytest.mark.parametrize("packed", [False, True], ids=["framing1", "framing2"])
def test_checked_reply_headers_pass_byte_for_byte_and_odd_ones_are_repacked(broker, packed):
    """Framing 2 takes the compiled path (protocol/fastcheck.py via split_results): an odd header it
    accepts but that does not pass (another epoch or worker, another id) still goes on re-packed."""
    def body(header_bytes: bytes) -> bytes:
        return pack([header_bytes]) if packed else header_bytes

    w = register(broker, b"w")
    client = dealer(broker, "frontend")
    out = [["y", "float32", [1, 4], X.tobytes()]]
    request(client, "r1")
    hdr = next_request(broker, w)
    stamped = pack({"id": "r1", "key": hdr["key"], "attempt": hdr["attempt"], "ok": True, "outputs": out,
                    "worker": "w", "epoch": broker.epoch, "version": 1, "model": "mlp", "batch_rows": 1})
    w.send_multipart([WORKER_PROTO, REPLY, body(stamped)])
    assert recv(broker, client)[3] == stamped  # the worker's own bytes
    for i, odd in enumerate(({"ack": True}, {"epoch": "old"}, {"worker": "someone-else"}, {"error": "x"},
                             {"model": ["m"]}, {"id": "not-the-clients"})):
        rid = f"odd{i}"
        request(client, rid)
        hdr = next_request(broker, w)
        header = {"id": rid, "key": hdr["key"], "attempt": hdr["attempt"], "ok": True, "outputs": out, "worker": "w",
                  "epoch": broker.epoch, "version": 1, **odd}
        w.send_multipart([WORKER_PROTO, REPLY, body(pack(header))])
        got = answer(recv(broker, client))
        assert got["ok"] is True and got["id"] == rid and "ack" not in got and "error" not in got
        assert got["epoch"] == broker.epoch and got["worker"] == "w"
        assert "version" not in got or type(got["version"]) is int
    assert b"w" in broker.workers  # odd but answerable: re-packed, the worker stays


def test_retryable_answers_are_not_remembered(broker):
    broker.cfg.max_queue = broker.queues.max_queue = 1
    w = register(broker, b"w", credit=1)
    client = dealer(broker, "frontend")
    request(client, "r1")
    h1 = next_request(broker, w)
    request(client, "r2")  # queued
    request(client, "r3")  # queue full
    got = answer(recv(broker, client))
    assert (got["id"], got["error"]["code"]) == ("r3", "OVERLOADED")
    reply_ok(w, h1)
    assert answer(recv(broker, client))["id"] == "r1"
    reply_ok(w, next_request(broker, w))
    assert answer(recv(broker, client))["id"] == "r2"
    request(client, "r3")  # the retry under the same id now runs
    h3 = next_request(broker, w)
    assert h3["id"] == "r3"
    reply_ok(w, h3)
    assert answer(recv(broker, client))["ok"] is True


# ------------------------------------------------------------------ item 5: memory
def test_answer_cache_is_bounded_in_bytes():
    cache = AnsweredCache(max_ids=1000, max_bytes=1 << 20)
    for i in range(50):
        cache.add(("s", f"r{i}"), "m", [b"svc", b"\0" * (200 << 10)])
    assert cache.bytes <= 1 << 20 and cache.replies_held <= 5
    assert all(("s", f"r{i}") in cache for i in range(50))  # ids stay: a retried id is never run twice
    assert cache.reply(("s", "r49")) is not None and cache.reply(("s", "r0")) is None
    assert ("other", "r49") not in cache and cache.model(("s", "r3")) == "m"
    cache.add(("s", "huge"), "m", [b"\0" * (2 << 20)])
    assert ("s", "huge") in cache and cache.reply(("s", "huge")) is None and cache.bytes <= 1 << 20


def test_big_replies_stay_within_the_cache_budget_and_timeouts_are_capped(broker):
    w = register(broker, b"w", credit=8)
    client = dealer(broker, "frontend")
    big = np.zeros((1, 65536), np.float32)  # 256 KiB per reply against a 1 MiB budget
    for i in range(12):
        request(client, f"r{i}", timeout_ms=1e15)
        hdr = next_request(broker, w)
        assert hdr["timeout_ms"] <= 60_000  # capped by max_timeout
        w.send_multipart([WORKER_PROTO, REPLY, pack({"id": hdr["id"], "key": hdr["key"], "attempt": hdr["attempt"],
                                                     "ok": True, "version": 1,
                                                     "outputs": [["y", "float32", [1, 65536]]]}), big.tobytes()])
        assert answer(recv(broker, client))["ok"]
    assert broker.answered.bytes <= 1 << 20
    request(client, "r0")  # its answer is no longer held: told so, never run again
    got = answer(recv(broker, client))
    assert got["error"]["code"] == "BAD_REQUEST" and "no longer held" in got["error"]["message"]


def test_deadline_heap_does_not_keep_answered_requests(broker):
    broker.cfg.max_queue = broker.queues.max_queue = 5000
    w = register(broker, b"w", credit=64)
    client = dealer(broker, "frontend")
    for i in range(3000):
        request(client, f"r{i}", timeout_ms=50_000)
    seen = 0
    while seen < 3000:
        hdr = next_request(broker, w)
        reply_ok(w, hdr)
        seen += 1
    pump(broker, lambda: not broker.pending, 20)
    assert len(broker.deadlines) <= 2 * len(broker.pending) + 1024


def test_unknown_model_names_are_not_kept(broker):
    register(broker, b"w")
    client = dealer(broker, "frontend")
    for i in range(300):
        request(client, f"u{i}", model=f"nope-{i}".encode())
    for _ in range(300):
        assert answer(recv(broker, client))["error"]["code"] == "UNKNOWN_MODEL"
    assert set(broker.counters) <= {"mlp"} and broker.unknown_model_requests == 300
    adm = dealer(broker, "admin")
    adm.send_multipart([b"", pack({"cmd": "status"})])
    status = unpack_map(recv(broker, adm)[-1])
    assert set(status["models"]) == {"mlp"}


# ------------------------------------------------------------------ item 6: dispatch
def _pending(rid: str, version: int | None = None) -> PendingRequest:
    return PendingRequest(rid, rid, b"c", b"mlp", "mlp", version, pack({"id": rid, "inputs": [["x", "float32", [1, 4]]]}),
                          [X.tobytes()], time.monotonic() + 30, time.monotonic())


def test_queues_keep_one_fifo_per_pin_and_front_goes_first():
    q = ModelQueues(max_queue=10_000)
    reqs = [_pending(f"p{i}", 2) for i in range(1000)] + [_pending("any"), _pending("v1", 1)]
    for r in reqs:
        q.push(r)
    assert q.depth("mlp") == 1002
    heads = dict(q.heads("mlp"))
    assert heads[2].rid == "p0" and heads[None].rid == "any" and heads[1].rid == "v1"
    q.remove(reqs[0])
    back = _pending("back", 2)
    q.push(back, front=True)
    assert dict(q.heads("mlp"))[2].rid == "back" and back.seq < reqs[1].seq
    for r in [back, *reqs[1:]]:
        q.remove(r)
    assert q.depth("mlp") == 0 and q.models() == []


def test_dispatch_cost_does_not_grow_with_the_queue(broker):
    busy = register(broker, b"v2", credit=1, models={"mlp": {"version": 2}})
    free = register(broker, b"v1", credit=1, models={"mlp": {"version": 1}})
    client = dealer(broker, "frontend")
    for i in range(1000):
        request(client, f"p{i}", version=2)
    pump(broker, lambda: broker.queues.depth("mlp") == 999, 20)
    assert next_request(broker, busy)["id"] == "p0"
    before = broker.queues.heads_examined
    for _ in range(50):  # events that make the master look for work for the free v1 worker
        broker.dispatch("mlp")
    assert broker.queues.heads_examined - before <= 50 * 2  # the head of each pin, not 999 requests
    assert silent(broker, free, 0.1)


def test_eviction_during_dispatch_never_sends_twice_or_past_credit(broker):
    dead = register(broker, b"A", credit=4)  # sorts first for round-robin
    live = register(broker, b"B", credit=3)
    dead.close(linger=0)
    probe_end = time.monotonic() + 5
    while broker._send_raw(broker.backend, [b"A", b"probe"]) and time.monotonic() < probe_end:
        time.sleep(0.02)  # until the ROUTER knows A's connection is gone
    for rid in ("r1", "r2"):
        req = _pending(rid)
        broker.pending[rid] = req
        broker.queues.push(req)
    broker.dispatch("mlp")  # r1 -> A fails, A is evicted, r1 and r2 go to B inside that eviction
    got = [next_request(broker, live) for _ in range(2)]
    assert sorted(h["id"] for h in got) == ["r1", "r2"]
    assert silent(broker, live, 0.2)  # nothing sent twice
    assert len(broker.workers[b"B"].in_flight) <= 3


def test_a_run_of_dead_workers_neither_uses_up_retries_nor_recurses(broker):
    """Sends that never left (the peer is gone) do not count as attempts, and the evictions they
    cause dispatch from a worklist, not recursively: 400 dead peers cannot exhaust either."""
    dead = [register(broker, b"d%04d" % i, credit=1) for i in range(400)]
    live = register(broker, b"zlive", credit=1)
    for s in dead:
        s.close(linger=0)
    probe_end = time.monotonic() + 10
    while broker._send_raw(broker.backend, [b"d0399", b"probe"]) and time.monotonic() < probe_end:
        time.sleep(0.02)
    req = _pending("r1")
    broker.pending["r1"] = req
    broker.queues.push(req)
    broker.dispatch("mlp")
    assert next_request(broker, live)["id"] == "r1" and req.attempts == 1
    assert list(broker.workers) == [b"zlive"]


# ------------------------------------------------------- item 7: malformed messages
@pytest.mark.parametrize("inputs", [
    [["x", ["float32"], [1, 4]]],
    [["x", {"a": 1}, [1, 4]]],
    [["x", "float32", [0, 2**63]]],
    [["x", "float32", [0, 2**31, 2**31]]],
    [["x" * 10_000, "float32", [1, 4]]],
])
def test_malformed_tensor_lists_get_bad_request(broker, inputs):
    register(broker, b"w")
    client = dealer(broker, "frontend")
    client.send_multipart([b"", b"MDPC01", b"mlp", pack({"id": "bad", "inputs": inputs}), b""])
    got = answer(recv(broker, client))
    assert got["id"] == "bad" and got["error"]["code"] == "BAD_REQUEST"


@pytest.mark.parametrize("frames", [
    [WORKER_PROTO, REPLY],
    [WORKER_PROTO, REPLY, pack({"ok": True})],
    [WORKER_PROTO, REPLY, b"\xc1"],
    [WORKER_PROTO, REPLY, pack({"id": "zz", "attempt": 1, "ok": True, "outputs": [["y", "float32", [4]]]}), b"x"],
    [WORKER_PROTO, HEARTBEAT, pack([1])],
    [WORKER_PROTO, REQUEST, pack({})],
])
def test_malformed_worker_messages_get_disconnect(broker, frames):
    w = register(broker, b"w")
    w.send_multipart(frames)
    got = recv(broker, w)
    assert got[:2] == [WORKER_PROTO, DISCONNECT] and unpack_map(got[2])["error"]["code"] == "BAD_REQUEST"
    assert b"w" not in broker.workers


def test_deeply_nested_admin_command_is_answered(broker):
    adm = dealer(broker, "admin")
    nested: object = "x"
    for _ in range(1000):
        nested = [nested]
    for cmd in ({"cmd": nested}, {"cmd": "drain", "worker": nested}, {"cmd": {"a": nested}}):
        adm.send_multipart([b"", pack(cmd)])
        got = unpack_map(recv(broker, adm)[-1])
        assert got["ok"] is False and got["error"]["code"] == "BAD_REQUEST" and len(got["error"]["message"]) < 300


# -------------------------------------------------------------------- item 8: RFC 8
def test_mmi_service_answers_plain_rfc8_codes(broker):
    register(broker, b"w")
    client = dealer(broker, "frontend")
    for service, body, code in ((b"mmi.service", b"mlp", b"200"), (b"mmi.service", b"nope", b"404"),
                                (b"mmi.nothing", b"mlp", b"501")):
        client.send_multipart([b"", b"MDPC01", service, body])
        assert recv(broker, client) == [b"", b"MDPC01", service, code]


def test_start_up_grace_keeps_only_a_bounded_number_of_unknown_names_waiting(broker):
    broker.in_grace, broker.grace_until = True, time.monotonic() + 60
    client = dealer(broker, "frontend")
    for i in range(100):
        request(client, f"g{i}", model=f"later-{i}".encode())
    refused = [answer(recv(broker, client)) for _ in range(100 - 64)]
    assert {r["error"]["code"] for r in refused} == {"UNKNOWN_MODEL"}
    assert len(broker.queues.models()) == 64 and len(broker.pending) == 64
    request(client, "g-again", model=b"later-0")  # a name already waiting may queue more
    pump(broker, lambda: any(r.rid == "g-again" for r in broker.pending.values()))


def test_models_map_keeps_versions_held_side_by_side_and_refusals():
    from ringserve.master.registry import WorkerRecord
    from ringserve.protocol.envelope import parse_models

    clean = parse_models({"m": {"version": 4, "versions": [3, 4, 4], "refused": {"version": 5, "reason": "x" * 600}}})
    assert clean["m"]["versions"] == [3, 4] and clean["m"]["refused"]["version"] == 5
    w = WorkerRecord(b"id", "w", clean, 4, "cpu", None)
    assert w.versions("m") == {3, 4} and w.serves("m", 3) and w.serves("m", 4) and not w.serves("m", 5)
    for bad in ({"versions": "3"}, {"versions": [3] * 17}, {"versions": [-1]}, {"refused": "no"},
                {"refused": {"version": "x"}}, {"refused": {"version": 1, "reason": "y" * 5000}}):
        with pytest.raises(ProtocolError):
            parse_models({"m": {"version": 1, **bad}})


@pytest.mark.parametrize("version", [2**63, 2**64 - 1])
def test_a_pin_past_what_a_version_can_be_is_unknown_and_the_master_keeps_serving(broker, version):
    """A client's version pin is only checked non-negative (tests/test_protocol_bounds.py): one past
    2**63 - 1 matches no version a worker can announce, so it is answered UNKNOWN_VERSION at once,
    never dispatched, and the next request is served as usual."""
    w = register(broker, b"w")
    client = dealer(broker, "frontend")
    request(client, "huge", version=version)
    got = answer(recv(broker, client))
    assert got["id"] == "huge" and got["error"]["code"] == "UNKNOWN_VERSION", got
    request(client, "next")
    assert next_request(broker, w)["id"] == "next"
