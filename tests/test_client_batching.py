"""Issue 22, coalesced client traffic: a ringserve client puts the requests of one I/O turn in one
message (mmi.batch) and the master answers a batching client with one message per turn; every
per-request guarantee holds inside a shared message, and an old master (501) gets singles."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import zmq

from ringserve.client import AsyncClient, Client
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.envelope import (
    answers_frames, batch_frames, batch_frames_packed, request_body, split_batch, split_replies,
)
from ringserve.protocol.messages import MDP_CLIENT
from test_master_robustness import X, dealer, next_request, recv, register, reply_ok

pytestmark = pytest.mark.timeout(90)


def batch(sock: zmq.Socket, requests: list[tuple[bytes, list]]) -> None:
    sock.send_multipart([b"", MDP_CLIENT, b"mmi.batch", *batch_frames(requests)])


def answers_of(frames: list) -> list[dict]:
    assert frames[:3] == [b"", MDP_CLIENT, b"mmi.batch"], frames[:3]
    return [h for _, h, _ in split_replies(frames[3:])]


def test_a_batch_is_answered_per_request_and_in_one_message(broker):
    w = register(broker, b"w")
    client = dealer(broker, "frontend")
    good = request_body("good", {"x": X})
    bad = [pack({"id": "bad", "inputs": [["x", "float32", [1, 4], None]]})]  # nil data: refused alone
    batch(client, [(b"mlp", good), (b"mlp", bad), (b"nobody", request_body("unknown", {"x": X}))])
    first = answers_of(recv(broker, client))  # the refusals of this turn, together
    assert {a["id"]: a["error"]["code"] for a in first} == {"bad": "BAD_REQUEST", "unknown": "UNKNOWN_MODEL"}
    reply_ok(w, next_request(broker, w))
    got = recv(broker, client)
    assert [a["id"] for a in answers_of(got)] == ["good"] and got[-1] == X.tobytes()  # its tensor, a frame


def test_a_batch_whose_framing_breaks_keeps_the_requests_before_the_break(broker):
    w = register(broker, b"w")
    client = dealer(broker, "frontend")
    frames = batch_frames([(b"mlp", request_body("ok1", {"x": X})), (b"mlp", request_body("ok2", {"x": X}))])
    client.send_multipart([b"", MDP_CLIENT, b"mmi.batch", *frames[:-1]])  # ok2's header without its data... cut
    got = answers_of(recv(broker, client))
    assert any(a["id"] is None and "batch" in a["error"]["message"] for a in got)
    hdr = next_request(broker, w)
    assert hdr["id"] == "ok1"


def test_the_client_coalesces_and_every_answer_is_its_own(cluster):
    cluster.start_master()
    cluster.start_workers(1, model="echo=ringserve.worker.demo:slow,arg.delay=0.001")
    with Client(cluster.frontend, timeout=20) as c:
        futs = [c.infer_async("echo", {"x": np.full((1, 4), float(i), np.float32)}) for i in range(200)]
        for i, f in enumerate(futs):
            assert f.result(timeout=30).outputs["y"][0, 0] == float(i)
        assert c.stats.batches_sent > 0 and c.stats.batches_received > 0, c.stats
        assert c.infer("echo", {"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 4)  # a lone one: plain

    async def run():
        async with AsyncClient(cluster.frontend, timeout=20) as ac:
            replies = await asyncio.gather(*(ac.infer_reply("echo", {"x": np.full((1, 4), float(i), np.float32)})
                                             for i in range(100)))
            assert [r.outputs["y"][0, 0] for r in replies] == [float(i) for i in range(100)]
            return ac.stats.batches_sent

    assert asyncio.run(run()) > 0
    cluster.check_books()


def test_an_old_master_that_answers_501_gets_one_message_per_request(zctx):
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    seen = []

    def old_master():
        while not stop.is_set():
            if not router.poll(50):
                continue
            ident, _, _, service, *body = router.recv_multipart()
            seen.append(service)
            if service in (b"mmi.batch", b"mmi.batch2"):  # RFC 8: any mmi.* name it does not know
                router.send_multipart([ident, b"", MDP_CLIENT, service, b"501"])
            elif service == b"mmi.ping":
                router.send_multipart([ident, b"", MDP_CLIENT, service, pack({"ok": True, "epoch": "old"})])
            else:
                header = unpack_map(body[0])
                router.send_multipart([ident, b"", MDP_CLIENT, service, pack(
                    {"id": header["id"], "ok": True, "epoch": "old", "outputs": header["inputs"]}), *body[1:]])

    t = threading.Thread(target=old_master, daemon=True)
    t.start()
    try:
        with Client(f"tcp://127.0.0.1:{port}", timeout=10) as c:
            futs = [c.infer_async("echo", {"x": np.full((1, 4), float(i), np.float32)}) for i in range(20)]
            assert [f.result(timeout=20).outputs["x"][0, 0] for f in futs] == [float(i) for i in range(20)]
    finally:
        stop.set()
        t.join(5)
        router.close(linger=0)
    assert b"mmi.batch" in seen and seen.count(b"echo") >= 20


def test_a_packed_batch_is_answered_packed_and_an_old_style_batch_as_before(broker):
    """Issue 22: "mmi.batch2" carries every header in its first frame and gets its answers' headers in
    one frame; a client of the earlier release ("mmi.batch") still gets one frame per answer header."""
    w = register(broker, b"w")
    new, old = dealer(broker, "frontend"), dealer(broker, "frontend")
    big = np.arange(20000, dtype=np.float32).reshape(1, 20000)  # 80 kB: a frame of its own
    new.send_multipart([b"", MDP_CLIENT, b"mmi.batch2", *batch_frames_packed(
        [(b"mlp", request_body("p1", {"x": X})), (b"mlp", request_body("p2", {"x": big})),
         (b"nobody", request_body("p3", {"x": X}))])])
    refused = recv(broker, new)
    assert refused[:3] == [b"", MDP_CLIENT, b"mmi.batch2"] and len(refused) == 4  # one header list, no tensors
    assert [(a["id"], a["error"]["code"]) for _, a, _ in split_replies(refused[3:])] == [("p3", "UNKNOWN_MODEL")]
    batch(old, [(b"mlp", request_body("o1", {"x": X})), (b"mlp", request_body("o2", {"x": X}))])
    for _ in range(4):
        reply_ok(w, next_request(broker, w))
    got = recv(broker, new)
    assert got[:3] == [b"", MDP_CLIENT, b"mmi.batch2"]
    assert sorted(a["id"] for _, a, _ in split_replies(got[3:])) == ["p1", "p2"]
    got = recv(broker, old)
    assert got[:3] == [b"", MDP_CLIENT, b"mmi.batch"] and unpack_map(got[3])["id"] in ("o1", "o2")  # a header frame
    assert sorted(a["id"] for a in answers_of(got)) == ["o1", "o2"]


def test_a_master_that_batches_but_does_not_pack_gets_mmi_batch(zctx):
    """The earlier release's master knows "mmi.batch", not "mmi.batch2" (501): the client goes on with
    "mmi.batch", every request answered once."""
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    seen = []

    def answer(header, data):
        return [pack({"id": header["id"], "ok": True, "epoch": "old", "outputs": header["inputs"]}), *data]

    def previous_master():
        while not stop.is_set():
            if not router.poll(50):
                continue
            ident, _, _, service, *body = router.recv_multipart()
            seen.append(service)
            if service == b"mmi.batch2":
                router.send_multipart([ident, b"", MDP_CLIENT, service, b"501"])
            elif service == b"mmi.batch":
                entries, broken = split_batch(body)
                assert broken is None
                bodies = [answer(h, d) for _, _, h, d in entries]
                router.send_multipart([ident, b"", MDP_CLIENT, service, *answers_frames(bodies, False)])
            elif service == b"mmi.ping":
                router.send_multipart([ident, b"", MDP_CLIENT, service, pack({"ok": True, "epoch": "old"})])
            else:
                router.send_multipart([ident, b"", MDP_CLIENT, service, *answer(unpack_map(body[0]), body[1:])])

    t = threading.Thread(target=previous_master, daemon=True)
    t.start()
    try:
        # failover_after well past the test: a fail-over (the fake master's thread starved for 0.6 s on a
        # loaded machine) sets packed back to True on purpose, since the next master may be newer
        with Client(f"tcp://127.0.0.1:{port}", timeout=10, failover_after=60.0) as c:
            futs = [c.infer_async("echo", {"x": np.full((1, 4), float(i), np.float32)}) for i in range(20)]
            assert [f.result(timeout=20).outputs["x"][0, 0] for f in futs] == [float(i) for i in range(20)]
            assert c._rel.stats.failovers == 0
            assert c._rel.packed is False  # told 501 once, it stays with mmi.batch
    finally:
        stop.set()
        t.join(5)
        router.close(linger=0)
    assert b"mmi.batch2" in seen and b"mmi.batch" in seen


def test_a_worker_that_reads_framing_2_gets_one_frame_and_its_packed_reply_reaches_every_client(broker):
    """Issue 22, the worker hop: a worker that says "framing": 2 in READY gets a REQUEST with the client
    headers in its dispatch entries (one frame when the tensors are inline) and may answer with the
    headers in one list; a worker that says nothing still gets one frame per header."""
    from ringserve.protocol.envelope import packed_reply_frames, parse_dispatch
    from ringserve.protocol.messages import HEARTBEAT, READY, REPLY, REQUEST, WORKER_PROTO
    from test_master_robustness import GOOD_MODELS

    w = dealer(broker, "backend", b"w2")
    w.send_multipart([WORKER_PROTO, READY, pack({"name": "w2", "models": GOOD_MODELS, "credit": 8, "framing": 2})])
    beat = recv(broker, w)
    assert beat[:2] == [WORKER_PROTO, HEARTBEAT] and unpack_map(beat[2])["framing"] == 2
    client = dealer(broker, "frontend")
    inline = lambda rid: request_body(rid, {"x": X})  # noqa: E731  (16 bytes: inline)
    batch(client, [(b"mlp", inline("a")), (b"mlp", inline("b")), (b"mlp", inline("c"))])
    frames = recv(broker, w)
    assert frames[:2] == [WORKER_PROTO, REQUEST] and len(frames) == 3  # the dispatch list carries every header
    got = parse_dispatch(frames[2:])
    assert [d.cid for d in got] == ["a", "b", "c"] and all(d.error is None for d in got)
    headers = [pack({"id": d.cid, "key": d.key, "attempt": d.attempt, "ok": True, "version": 1,
                     "outputs": [["y", "float32", [1, 4]]]}) for d in got]
    w.send_multipart([WORKER_PROTO, REPLY, *packed_reply_frames(headers, [X.tobytes()] * 3)])
    answers = answers_of(recv(broker, client))
    assert sorted(a["id"] for a in answers) == ["a", "b", "c"] and all(a["ok"] for a in answers)
    broker_books = broker.books()
    assert broker_books["ok"] and broker_books["pending"] == 0
