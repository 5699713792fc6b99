"""Issue 10 items 9-11 and issue 8's input errors: a worker answers every request it takes,
blames the input only when the input is the cause, and leaves when its compute is stuck."""
from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from ringserve.client import BadRequest, Client, Internal
from ringserve.launch.procs import RoleProcess, wait_until
from ringserve.protocol.codec import pack, unpack_map
from tests.conftest import raw_socket

pytestmark = pytest.mark.timeout(180)

EMBED = "enc=ringserve.worker.demo:embed"  # vocab 100, max_len 32


def ids(*rows: list[int]) -> dict:
    a = np.array(rows, np.int64)
    return {"ids": a, "mask": np.ones_like(a)}


def test_input_errors_are_bad_request_with_a_clear_line(cluster, zctx):
    cluster.start_master()
    cluster.start_workers(1, model=EMBED)
    cluster.start_workers(1, model="echo=ringserve.worker.demo:noop")
    with Client(cluster.frontend, timeout=20) as c:
        with pytest.raises(BadRequest, match="out of range.*vocabulary"):
            c.infer("enc", ids([1, 2, 500]))
        with pytest.raises(BadRequest, match="out of range.*longer than the model"):
            c.infer("enc", ids(list(range(40))))
        with pytest.raises(BadRequest, match="do not fit the model"):
            c.infer("enc", {"ids": np.ones((1, 5), np.int64), "mask": np.ones((1, 4), np.int64)})
        with pytest.raises(BadRequest, match="empty"):
            c.infer("enc", {"ids": np.ones((1, 0), np.int64), "mask": np.ones((1, 0), np.int64)})
        with pytest.raises(BadRequest, match="zero rows"):
            c.infer("enc", {"ids": np.ones((0, 4), np.int64), "mask": np.ones((0, 4), np.int64)})
        with pytest.raises(BadRequest, match="dtype float64, expected int64"):
            c.infer("enc", {"ids": np.ones((1, 4)), "mask": np.ones((1, 4), np.int64)})
        assert c.infer("enc", ids([1, 2, 3]))["embedding"].shape == (1, 16)
        # a model error that is not about the input stays INTERNAL
        with pytest.raises(Internal, match="NaN"):
            c.infer("echo", {"x": np.full((1, 3), np.nan, np.float32)})
    # a 0-d input (the client library would send it as shape [1]: say it raw)
    front = raw_socket(zctx, zmq.DEALER, cluster.frontend)
    front.send_multipart([b"", b"MDPC01", b"echo", pack({"id": "s0", "inputs": [["x", "float32", []]]}),
                          np.float32(1).tobytes()])
    reply = unpack_map(front.recv_multipart()[3])
    assert reply["error"]["code"] == "BAD_REQUEST" and "scalar" in reply["error"]["message"]
    assert all(p.alive() for p in cluster.procs)


def test_one_bad_request_fails_alone_in_its_batch(cluster):
    cluster.start_master()
    cluster.start_workers(1, "--max-batch-size", "16", "--max-queue-delay-us", "300000", model=EMBED)
    with Client(cluster.frontend, timeout=30) as c:
        good = [c.infer_async("enc", ids([1, 2, 3, k])) for k in range(5)]
        bad = c.infer_async("enc", ids([1, 2, 3, 999]))
        results = [f.result(timeout=30) for f in good]
        with pytest.raises(BadRequest, match="vocabulary"):
            bad.result(timeout=30)
        assert all(r.outputs["embedding"].shape == (1, 16) for r in results)
        # the singles re-run gives the same numbers as running alone
        np.testing.assert_allclose(results[4].outputs["embedding"], c.infer("enc", ids([1, 2, 3, 4]))["embedding"],
                                   rtol=1e-5, atol=1e-6)
    assert cluster.workers[0].alive()


def test_unencodable_output_is_answered_and_worker_serves_on(cluster):
    cluster.start_master()
    cluster.start_workers(1, "--max-batch-size", "4", model="cx=ringserve.worker.demo:complex_out")
    with Client(cluster.frontend, timeout=20) as c:
        for _ in range(3):  # before the fix the compute thread died on the first and the rest timed out
            with pytest.raises(Internal, match="complex"):
                c.infer("cx", {"x": np.ones((2, 3), np.float32)})
    assert cluster.workers[0].alive()


def test_stuck_compute_makes_the_worker_leave_and_work_is_requeued(cluster):
    cluster.start_master()
    stuck = cluster.start_workers(1, "--compute-stall-s", "1", model="m=ringserve.worker.demo:slow,arg.delay=60")[0]
    cluster.start_workers(1, model="m=ringserve.worker.demo:noop")
    x = {"x": np.ones((1, 3), np.float32)}
    with Client(cluster.frontend, timeout=40) as c:
        futures = [c.infer_async("m", x) for _ in range(8)]  # some land on the stuck worker
        for f in futures:
            np.testing.assert_array_equal(f.result(timeout=40).outputs["y"], x["x"])
    assert wait_until(lambda: not stuck.alive(), 30, what="stuck worker to exit")
    assert stuck.proc.returncode == 1
    assert "worker_leaving" in stuck.log_path.read_text()


def test_child_writing_lots_to_stdout_after_ready_never_blocks(tmp_path):
    marker = tmp_path / "finished"
    child = RoleProcess("tests.chatty_child", [str(marker)], tmp_path / "chatty.log")
    try:
        wait_until(marker.exists, 30, what="child to write 1 MiB and finish")
        assert child.wait(10) == 0
    finally:
        child.stop()
    assert (tmp_path / "chatty.log").stat().st_size >= 1 << 20


def test_dead_compute_thread_makes_the_worker_say_disconnect(zctx):
    """If the compute thread is gone, heartbeats alone would keep the worker registered: it leaves."""
    from ringserve.protocol.messages import DISCONNECT, READY, WORKER_PROTO
    from ringserve.worker.agent import WorkerAgent, WorkerConfig

    master = zctx.socket(zmq.ROUTER)
    master.setsockopt(zmq.LINGER, 0)
    master.bind("tcp://127.0.0.1:*")
    agent = WorkerAgent(WorkerConfig(master=master.getsockopt(zmq.LAST_ENDPOINT).decode(), name="dead"), {},
                        ctx=zctx)
    try:
        agent._connect(agent.links[0])
        assert master.poll(5000) and master.recv_multipart()[1:3] == [WORKER_PROTO, READY]
        agent.on_tick(time.monotonic())  # the compute thread was never started: it is not alive
        assert agent.done and agent.failed == "compute thread died"
        assert master.poll(5000)
        msg = master.recv_multipart()
        while msg[2] != DISCONNECT and master.poll(2000):  # a heartbeat may come first
            msg = master.recv_multipart()
        assert msg[1:3] == [WORKER_PROTO, DISCONNECT]
        assert unpack_map(msg[3])["reason"] == "compute thread died"
    finally:
        agent.close()
        master.close(linger=0)
