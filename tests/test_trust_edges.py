"""Issue 16, the master's side: one tenant cannot stall, read or double-run another's work, and a
worker is trusted no further than it must be. A real Broker on real sockets, its loop pumped by the
test, with fake workers and clients (the harness of test_master_robustness.py); each test ends
with the credit invariant (`Broker.books`)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
import zmq.auth

from ringserve.master.broker import Broker, BrokerConfig
from ringserve.protocol.codec import pack
from ringserve.protocol.envelope import MAX_ID_LEN
from ringserve.protocol.messages import DISCONNECT, HEARTBEAT, READY, REPLY, WORKER_PROTO
from ringserve.protocol.security import Security, create_identity, public_path, revoke_identity, secret_path
from test_master_robustness import (
    EP, GOOD_MODELS, X, answer, dealer, next_request, pump, recv, register, reply_ok, request, silent,
)

pytestmark = pytest.mark.timeout(60)


def models(*versions: int) -> dict:
    return {"mlp": {**GOOD_MODELS["mlp"], "version": max(versions), "versions": list(versions)}}


def settled(b: Broker) -> dict:
    """The books once nothing is in flight: every slot accounted for, none leaked."""
    books = b.books()
    assert books["leaked"] == 0 and books["in_flight"] == books["assigned"], books
    return books


def from_address(b: Broker, source: str) -> zmq.Socket:
    """A client DEALER whose connection comes from another loopback address (another scope)."""
    s = b.ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    port = b.endpoints["frontend"].rsplit(":", 1)[1]
    s.connect(f"tcp://{source}:0;127.0.0.1:{port}")
    return s


# ------------------------------------------------------------------ item 1
def test_a_nil_inline_entry_is_refused_by_the_master_as_the_worker_would(broker):
    w = register(broker, b"w")
    client = dealer(broker, "frontend")
    client.send_multipart([b"", b"MDPC01", b"mlp", pack({"id": "nil", "inputs": [["x", "float32", [1, 4], None]]}),
                           X.tobytes()])
    got = answer(recv(broker, client))
    assert got["error"]["code"] == "BAD_REQUEST" and "fourth item" in got["error"]["message"]
    assert silent(broker, w, 0.2)  # it never reached the worker
    settled(broker)


def test_a_slot_whose_deadline_passed_in_flight_is_given_back(broker):
    w = register(broker, b"w", credit=1)
    client = dealer(broker, "frontend")
    request(client, "lost", timeout_ms=200)
    next_request(broker, w)  # the worker takes it and never answers
    assert answer(recv(broker, client))["error"]["code"] == "TIMEOUT"
    assert broker.workers[b"w"].in_flight == {}  # the slot is back
    request(client, "next")
    hdr = next_request(broker, w)  # so the worker gets the next request
    reply_ok(w, hdr)
    assert answer(recv(broker, client))["ok"] is True
    settled(broker)


# ------------------------------------------------------------------ item 2
def test_a_shadow_copy_of_a_longest_id_is_answered_and_frees_its_slot(broker):
    live = register(broker, b"live", models=models(1))
    shadow = register(broker, b"shadow", credit=1, models=models(2))
    assert broker.on_admin_command({"cmd": "route", "model": "mlp", "split": "1=100", "shadow": 2})["ok"]
    client = dealer(broker, "frontend")
    rid = "x" * MAX_ID_LEN
    request(client, rid)
    hdrs = {}
    for _ in range(2):
        pump(broker, lambda: live.poll(0) or shadow.poll(0))
        sock = live if live.poll(0) else shadow
        hdrs[sock] = next_request(broker, sock)
    assert hdrs[shadow]["id"] == rid and len(hdrs[shadow]["key"]) <= MAX_ID_LEN
    reply_ok(shadow, hdrs[shadow])
    reply_ok(live, hdrs[live])
    assert answer(recv(broker, client))["id"] == rid
    pump(broker, lambda: not broker.workers[b"shadow"].in_flight)
    settled(broker)


# ------------------------------------------------------------------ item 3
def test_an_id_is_the_clients_own_another_scope_runs_its_own_request(broker):
    w = register(broker, b"w")
    a = dealer(broker, "frontend")
    b = from_address(broker, "127.0.0.2")
    request(a, "shared")
    ha = next_request(broker, w)
    reply_ok(w, ha)
    assert answer(recv(broker, a))["ok"] is True
    request(b, "shared")  # the same id from another scope is another request: it runs
    hb = next_request(broker, w)
    assert hb["id"] == "shared" and hb["key"] != ha["key"]
    reply_ok(w, hb)
    assert answer(recv(broker, b))["ok"] is True
    settled(broker)


def test_a_remembered_answer_is_given_only_for_the_same_model(broker):
    w = register(broker, b"w", models={**GOOD_MODELS, "other": GOOD_MODELS["mlp"]})
    client = dealer(broker, "frontend")
    request(client, "r1")
    reply_ok(w, next_request(broker, w))
    assert answer(recv(broker, client))["ok"] is True
    request(client, "r1", model=b"other")
    got = answer(recv(broker, client))
    assert got["error"]["code"] == "BAD_REQUEST" and "id in use" in got["error"]["message"]
    request(client, "r2")  # held, then asked for another model while it runs
    hdr = next_request(broker, w)
    request(client, "r2", model=b"other")
    assert "id in use" in answer(recv(broker, client))["error"]["message"]
    reply_ok(w, hdr)
    assert answer(recv(broker, client))["ok"] is True
    settled(broker)


def _keyed_broker(keys_dir: str, **cfg) -> Broker:
    ctx = zmq.Context()
    b = Broker(BrokerConfig(EP, EP, EP, policy="round-robin", heartbeat_interval=60.0, seed=1, max_timeout=60.0,
                            security=Security(keys_dir, "master", "m"), **cfg), ctx)
    b.in_grace = False
    b.last_heartbeat = time.monotonic()
    return b


def _curve_dealer(b: Broker, which: str, keys_dir: str, role: str, name: str) -> zmq.Socket:
    s = b.ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(secret_path(keys_dir, role, name))
    s.curve_serverkey = zmq.auth.load_certificate(public_path(keys_dir, "master", "m"))[0]
    s.connect(b.endpoints[which])
    return s


@pytest.fixture
def keyed(tmp_path):
    d = str(tmp_path / "keys")
    for role, names in (("master", ["m"]), ("worker", ["gpu-a", "evil"]), ("client", ["tenant-a", "tenant-b"])):
        for n in names:
            create_identity(d, role, n)
    b = _keyed_broker(d)
    yield b, d
    ctx = b.ctx
    b.close()
    ctx.destroy(linger=0)


def _register_keyed(b: Broker, d: str, key: str, name: str, credit: int = 4) -> zmq.Socket:
    w = _curve_dealer(b, "backend", d, "worker", key)
    w.send_multipart([WORKER_PROTO, READY, pack({"name": name, "models": GOOD_MODELS, "credit": credit})])
    assert recv(b, w)[:2] == [WORKER_PROTO, HEARTBEAT]
    return w


def test_with_keys_tenant_b_cannot_read_tenant_as_answer(keyed):
    b, d = keyed
    w = _register_keyed(b, d, "gpu-a", "gpu-a")
    ta = _curve_dealer(b, "frontend", d, "client", "tenant-a")
    tb = _curve_dealer(b, "frontend", d, "client", "tenant-b")
    request(ta, "secret-id")
    ha = next_request(b, w)
    w.send_multipart([WORKER_PROTO, REPLY, pack({"id": ha["id"], "key": ha["key"], "attempt": 1, "ok": True,
                                                 "version": 1, "outputs": [["y", "float32", [1, 4],
                                                                            np.full((1, 4), 7, np.float32).tobytes()]]})])
    assert answer(recv(b, ta))["ok"] is True
    request(tb, "secret-id")  # B guesses A's id: B's own request runs, B never sees A's outputs
    hb = next_request(b, w)
    assert hb["key"] != ha["key"]
    reply_ok(w, hb)
    frames = recv(b, tb)
    assert answer(frames)["ok"] is True and frames[4] == X.tobytes()  # its own outputs, not A's sevens
    settled(b)


# ------------------------------------------------------------------ item 4
def test_a_resend_of_a_held_or_answered_id_is_never_rate_limited(broker):
    broker.limiter = __import__("ringserve.master.ratelimit", fromlist=["RateLimiter"]).RateLimiter(0.5, 1)
    broker.cfg.rate_limit = 0.5
    w = register(broker, b"w")
    client = dealer(broker, "frontend")
    request(client, "r1")
    hdr = next_request(broker, w)
    request(client, "r1", ack=True)  # the client library's own resend while the first copy runs
    got = answer(recv(broker, client))
    assert got.get("ack") is True and "error" not in got
    reply_ok(w, hdr)
    assert answer(recv(broker, client))["ok"] is True
    other = dealer(broker, "frontend")  # a resend from a new socket after the answer: the answer again
    request(other, "r1", ack=True)
    assert answer(recv(broker, other))["ok"] is True
    request(client, "r2")  # a new id is limited as before
    assert answer(recv(broker, client))["error"]["code"] == "OVERLOADED"
    assert silent(broker, w, 0.1)  # and never ran twice
    settled(broker)


# ------------------------------------------------------------------ item 5
def test_a_routes_choice_is_made_again_when_its_worker_is_lost(broker):
    v1 = register(broker, b"v1", models=models(1))
    canary = register(broker, b"canary", models=models(2))
    assert broker.on_admin_command({"cmd": "route", "model": "mlp", "split": "2=100"})["ok"]
    client = dealer(broker, "frontend")
    request(client, "r1")
    assert next_request(broker, canary)["version"] == 2
    canary.send_multipart([WORKER_PROTO, DISCONNECT, pack({"reason": "dying"})])
    hdr = next_request(broker, v1)  # re-queued unpinned: the v1 worker takes it at once
    assert hdr["id"] == "r1" and hdr["version"] is None and hdr["attempt"] == 2
    reply_ok(v1, hdr)
    assert answer(recv(broker, client))["ok"] is True
    request(client, "pinned", version=2)  # a client's own pin still binds: it waits for a v2 worker
    assert silent(broker, v1, 0.2)
    settled(broker)


# ------------------------------------------------------------------ item 7
def test_a_model_served_a_moment_ago_is_unavailable_not_unknown(broker):
    broker.cfg.unavailable_grace = 5.0
    w = register(broker, b"w")
    w.send_multipart([WORKER_PROTO, DISCONNECT, pack({"reason": "evicted"})])
    pump(broker, lambda: not broker.workers)
    client = dealer(broker, "frontend")
    request(client, "waits")
    assert silent(broker, client, 0.3)  # queued, not UNKNOWN_MODEL
    back = register(broker, b"back")  # its worker comes back within the grace: served
    reply_ok(back, next_request(broker, back))
    assert answer(recv(broker, client))["ok"] is True
    settled(broker)


def test_a_pin_no_worker_serves_never_becomes_a_metric_label(broker):
    """Requests pinned to versions nobody serves, answered WORKER_LOST once the grace is over,
    count under no version: a client choosing version numbers cannot grow the series."""
    broker.cfg.unavailable_grace = 0.3
    w = register(broker, b"w")
    w.send_multipart([WORKER_PROTO, DISCONNECT, pack({"reason": "evicted"})])
    pump(broker, lambda: not broker.workers)
    client = dealer(broker, "frontend")
    for v in (7001, 7002, 7003):
        request(client, f"p{v}", version=v)
    got = [answer(recv(broker, client)) for _ in range(3)]
    assert [g.get("ok") for g in got] == [False] * 3, got
    labels = {s.labels.get("version") for m in broker.metrics.registry.collect() for s in m.samples
              if m.name == "ringserve_requests"}
    assert not labels & {"7001", "7002", "7003"}, labels
    settled(broker)


# ------------------------------------------------------------------ item 8
@pytest.mark.parametrize("version", [2, None, "1", 10**9])
def test_a_result_with_a_version_the_worker_never_announced_is_not_delivered(broker, version):
    liar = register(broker, b"liar", credit=1, models=models(1))
    client = dealer(broker, "frontend")
    request(client, "pinned", version=1)
    hdr = next_request(broker, liar)
    liar.send_multipart([WORKER_PROTO, REPLY, pack({"id": "pinned", "key": hdr["key"], "attempt": 1, "ok": True,
                                                    "version": version, "outputs": [["y", "float32", [1, 4]]]}),
                         X.tobytes()])
    again = next_request(broker, liar)  # the attempt failed: tried again (here the only worker)
    assert again["attempt"] == 2
    reply_ok(liar, again)
    got = answer(recv(broker, client))
    assert got["ok"] is True and got["version"] == 1
    labels = {s.labels.get("version") for m in broker.metrics.registry.collect() for s in m.samples
              if m.name == "ringserve_requests"}
    assert labels <= {"1", ""}, labels
    settled(broker)


# ------------------------------------------------------------------ items 9, 10
def test_with_keys_a_worker_is_its_keys_name(keyed):
    b, d = keyed
    real = _register_keyed(b, d, "gpu-a", "gpu-a")
    evil = _register_keyed(b, d, "evil", "gpu-a")  # claims another worker's name
    assert sorted(w.name for w in b.workers.values()) == ["evil", "gpu-a"]
    assert b.on_admin_command({"cmd": "drain", "worker": "gpu-a"})["draining"] == ["gpu-a"]
    assert silent(b, evil, 0.1) or recv(b, evil)[1] != b"\x06"  # no DRAIN for the impostor
    del real


def test_a_revoked_worker_key_is_cut_off_at_once(keyed):
    b, d = keyed
    bad = _register_keyed(b, d, "evil", "evil", credit=8)
    good = _register_keyed(b, d, "gpu-a", "gpu-a", credit=8)
    client = _curve_dealer(b, "frontend", d, "client", "tenant-a")
    revoke_identity(d, "worker", "evil")
    pump(b, lambda: all(w.name != "evil" for w in b.workers.values()), timeout=3)
    for i in range(6):
        request(client, f"r{i}")
    got = [next_request(b, good) for _ in range(6)]
    for hdr in got:
        reply_ok(good, hdr)
    assert sorted(answer(recv(b, client))["id"] for _ in range(6)) == [f"r{i}" for i in range(6)]
    frames = []
    while bad.poll(50):
        frames.append(bad.recv_multipart())
    assert all(f[1] != b"\x02" for f in frames)  # not one REQUEST after the revocation
    settled(b)


# ------------------------------------------------------------------ item 23
def test_a_resend_to_a_new_socket_is_remembered_there(broker):
    w = register(broker, b"w")
    first = dealer(broker, "frontend")
    request(first, "r1")
    reply_ok(w, next_request(broker, w))
    assert answer(recv(broker, first))["ok"] is True
    second = dealer(broker, "frontend")  # a reconnect: a new routing id
    request(second, "r1", ack=True)
    assert answer(recv(broker, second))["ok"] is True
    request(second, "r1", ack=True)  # again on that socket: the answer is already there, only an ACK
    got = answer(recv(broker, second))
    assert got.get("ack") is True and "outputs" not in got


def test_a_request_that_waited_out_the_start_up_grace_is_counted_once(broker):
    broker.in_grace, broker.grace_until = True, time.monotonic() + 60
    client = dealer(broker, "frontend")
    request(client, "early")
    pump(broker, lambda: broker.pending)
    assert broker.unknown_model_requests == 1
    w = register(broker, b"w")
    reply_ok(w, next_request(broker, w))
    assert answer(recv(broker, client))["ok"] is True
    c = broker.counters["mlp"]
    assert (c.requests, c.ok, broker.unknown_model_requests) == (1, 1, 0)
    settled(broker)
