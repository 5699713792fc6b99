"""Bad input never kills a process and always gets a typed error; good requests still succeed."""
from __future__ import annotations

import numpy as np
import pytest
import zmq

from ringserve.client import BadRequest, Client, Internal, UnknownModel
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.messages import DISCONNECT, READY, WORKER_PROTO
from tests.conftest import raw_socket

pytestmark = pytest.mark.timeout(120)

GOOD_X = np.ones((2, 256), np.float32)


def ask(sock, frames) -> dict:
    sock.send_multipart(frames)
    reply = sock.recv_multipart()
    assert reply[:2] == [b"", b"MDPC01"]
    return unpack_map(reply[3])


def code(reply: dict) -> str:
    assert reply["ok"] is False, reply
    return reply["error"]["code"]


def test_garbage_to_every_socket(cluster, zctx):
    cluster.start_master()
    cluster.start_workers(1)
    front = raw_socket(zctx, zmq.DEALER, cluster.frontend)
    hdr = lambda **kw: pack({"id": "r1", "inputs": [["x", "float32", [2, 256]]], **kw})  # noqa: E731

    # client socket
    assert code(ask(front, [b"garbage"])) == "BAD_REQUEST"
    assert code(ask(front, [b"", b"MDPC01", b"mlp", b"\xc1\xc1 not msgpack"])) == "BAD_REQUEST"
    assert code(ask(front, [b"", b"MDPC01", b"mlp", pack([1, 2, 3])])) == "BAD_REQUEST"
    missing = ask(front, [b"", b"MDPC01", b"mlp", pack({"id": "r2"})])
    assert code(missing) == "BAD_REQUEST" and "inputs" in missing["error"]["message"]
    short = ask(front, [b"", b"MDPC01", b"mlp", hdr(), GOOD_X.tobytes()[:-4]])
    assert code(short) == "BAD_REQUEST" and "bytes" in short["error"]["message"]
    assert code(ask(front, [b"", b"MDPC01", b"mlp", pack({"id": "r3", "inputs": [["x", "float32", [1]]]})])) \
        == "BAD_REQUEST"
    assert code(ask(front, [b"", b"MDPC01", b"\xff\xfe", hdr(), GOOD_X.tobytes()])) == "BAD_REQUEST"

    # worker socket: a peer that is not a worker, or a broken READY, is told DISCONNECT with an error
    fake = raw_socket(zctx, zmq.DEALER, cluster.master.info["backend"])
    for frames in ([b"junk"], [WORKER_PROTO, b"\x99"], [WORKER_PROTO, READY, b"\xc1"],
                   [WORKER_PROTO, READY, pack({"models": "no"})]):
        fake.send_multipart(frames)
        reply = fake.recv_multipart()
        assert reply[:2] == [WORKER_PROTO, DISCONNECT]
        assert unpack_map(reply[2])["error"]["code"] == "BAD_REQUEST"

    # admin socket
    adm = raw_socket(zctx, zmq.DEALER, cluster.admin)
    for frames in ([b"junk"], [b"", pack({"cmd": "explode"})], [b"", b"\xc1"]):
        adm.send_multipart(frames)
        assert unpack_map(adm.recv_multipart()[-1])["error"]["code"] == "BAD_REQUEST"

    # everyone is still alive and serving
    assert cluster.master.alive() and cluster.workers[0].alive()
    with Client(cluster.frontend, timeout=10) as c:
        assert c.infer("mlp", {"x": GOOD_X})["logits"].shape == (2, 10)


def test_typed_errors_from_client_library(cluster):
    cluster.start_master()
    cluster.start_workers(1, model="echo=ringserve.worker.demo:noop")
    cluster.start_workers(1, model="mlp=ringserve.worker.demo:mlp")
    with Client(cluster.frontend, timeout=10) as c:
        with pytest.raises(UnknownModel, match="resnet"):
            c.infer("resnet", {"x": GOOD_X})
        with pytest.raises(BadRequest, match=r"shape \[2, 255\], expected \['N', 256\]"):
            c.infer("mlp", {"x": np.ones((2, 255), np.float32)})
        with pytest.raises(BadRequest, match="dtype float64, expected float32"):
            c.infer("mlp", {"x": np.ones((2, 256), np.float64)})
        with pytest.raises(BadRequest, match="missing"):
            c.infer("mlp", {"y": GOOD_X})
        with pytest.raises(Internal, match="NaN"):
            c.infer("echo", {"x": np.full((1, 3), np.nan, np.float32)})
        assert c.infer("mlp", {"x": GOOD_X})["logits"].shape == (2, 10)
        np.testing.assert_array_equal(c.infer("echo", {"x": GOOD_X})["y"], GOOD_X)
    assert all(p.alive() for p in cluster.procs)
