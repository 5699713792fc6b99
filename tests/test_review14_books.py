"""Issue 22, review14: a hostile review of the master's books (response cache, credits and bounds,
what a worker writes reaching a client or a metric). Each test here failed on ff11cfd, before its fix.
A real Broker on ephemeral loopback ports, its loop pumped by hand; fake workers and clients are
DEALER sockets (tests/test_master_robustness.py's harness)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from ringserve.master.broker import Broker, BrokerConfig
from ringserve.protocol.codec import pack
from ringserve.protocol.envelope import batch_frames_packed, parse_dispatch, request_body, split_replies
from ringserve.protocol.messages import MDP_CLIENT, REPLY, REQUEST, WORKER_PROTO
from test_master_robustness import X, pump, register

pytestmark = pytest.mark.timeout(120)

EPHEMERAL = "tcp://127.0.0.1:*"
BIG = np.zeros((1, 1 << 17), np.float32)  # a 512 KiB answer: a few fill a small pipe and its TCP buffers


@pytest.fixture
def small_pipe_broker():
    """A Broker whose client-facing pipes hold one message (--hwm 1) with small kernel buffers, so an
    answer to a client that does not read is refused by ZeroMQ (EAGAIN) after a few."""
    ctx = zmq.Context()
    b = Broker(BrokerConfig(EPHEMERAL, EPHEMERAL, EPHEMERAL, policy="round-robin", heartbeat_interval=60.0, seed=1,
                            answer_cache_bytes=64 << 20, max_timeout=60.0, hwm=1), ctx)
    b.frontend.setsockopt(zmq.SNDBUF, 8192)  # for connections made from now on
    b.in_grace = False
    b.last_heartbeat = time.monotonic()
    yield b
    b.close()
    ctx.destroy(linger=0)


def _serve_big(w: zmq.Socket) -> int:
    """The fake worker answers every request it holds with a BIG result; returns how many."""
    n = 0
    while w.poll(0):
        msg = w.recv_multipart()
        if msg[:2] != [WORKER_PROTO, REQUEST]:
            continue
        for d in parse_dispatch(msg[2:]):
            w.send_multipart([WORKER_PROTO, REPLY, pack({"id": d.cid, "key": d.key, "attempt": d.attempt, "ok": True,
                                                         "version": 1, "outputs": [["y", "float32", [1, 1 << 17]]]}),
                              BIG.tobytes()])
            n += 1
    return n


def test_an_answer_zeromq_refused_to_a_batching_client_is_sent_again_in_full_not_acked(small_pipe_broker):
    """A batching client's answers go out at the end of the turn (_flush_clients); one ZeroMQ refuses
    there (the client's pipe is full) was still booked as delivered to that socket, so the client's
    resend (which asks for an ACK) got an ACK alone: it stopped resending and timed out, its answer
    never sent. Now a refused batch leaves its answers booked as undelivered: the resend gets them."""
    b = small_pipe_broker
    w = register(b, b"w", credit=64)
    client = b.ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.setsockopt(zmq.RCVHWM, 1)
    client.setsockopt(zmq.RCVBUF, 8192)
    client.connect(b.endpoints["frontend"])
    rids = [f"r{i}" for i in range(24)]
    answered = 0
    for rid in rids:  # one batch a turn, never read: the pipe fills and later answers are refused
        client.send_multipart([b"", MDP_CLIENT, b"mmi.batch2",
                               *batch_frames_packed([(b"mlp", request_body(rid, {"x": X}))])])
        deadline = time.monotonic() + 5
        while answered < rids.index(rid) + 1 and time.monotonic() < deadline:
            b.turn(10)
            answered += _serve_big(w)
        pump(b, timeout=0.05)
    assert answered == len(rids)
    got: dict[str, dict] = {}

    def read():
        while client.poll(0):
            msg = client.recv_multipart()
            for _, header, _ in split_replies(msg[3:]):
                got.setdefault(header["id"], header)
    end = time.monotonic() + 2
    while time.monotonic() < end:  # everything the pipes held arrives
        b.turn(10)
        read()
    lost = [rid for rid in rids if rid not in got]
    assert lost, "nothing was refused: the test did not fill the pipe"
    assert b.books()["ok"] and not b.pending  # every request was answered (to ZeroMQ, at least)
    for rid in lost:  # the client's resend asks for an ACK (client/reliable.py: sends > 1)
        client.send_multipart([b"", MDP_CLIENT, b"mmi.batch2", *batch_frames_packed(
            [(b"mlp", [pack({"id": rid, "inputs": [["x", "float32", [1, 4], X.tobytes()]], "ack": True})])])])
        again: list[dict] = []

        def step():
            b.turn(10)
            while client.poll(0):
                msg = client.recv_multipart()
                again.extend(h for _, h, _ in split_replies(msg[3:]))
            return again
        pump(b, step, timeout=5)
        assert again[0]["id"] == rid
        assert again[0].get("ok") is True and "ack" not in again[0], again[0]  # the answer itself
    client.close(linger=0)
    w.close(linger=0)


def test_workers_that_share_a_name_are_all_counted_in_the_in_flight_gauge(broker):
    """With keys a worker is the name of its key, and the secure deployment gives every worker pod
    the one key `worker` (deploy/overlays/secure/config/worker.toml): every pod registers as
    "worker". ringserve_worker_in_flight{worker} was set from {name: in flight}, so the last of
    them overwrote the others' figures; now it is their sum."""
    from test_master_robustness import next_request, request
    a = register(broker, b"wa", credit=2, name="worker")
    b = register(broker, b"wb", credit=2, name="worker")
    client = broker.ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(broker.endpoints["frontend"])
    for i in range(4):
        request(client, f"r{i}")
    for w in (a, b):  # round-robin: two each, held unanswered
        next_request(broker, w)
        next_request(broker, w)
    assert sum(len(w.in_flight) for w in broker.workers.values()) == 4
    broker._refresh_metrics()
    assert broker.metrics.registry.get_sample_value("ringserve_worker_in_flight", {"worker": "worker"}) == 4
    for s in (client, a, b):
        s.close(linger=0)
