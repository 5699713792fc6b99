"""End to end: client -> master -> worker -> model -> client, on real processes."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import zmq
from safetensors.torch import save_file

from ringserve.client import AsyncClient, Client, UnknownModel
from ringserve.client.errors import Timeout
from ringserve.protocol.codec import pack, unpack_map
from tests.conftest import raw_socket
from ringserve.worker import demo

pytestmark = pytest.mark.timeout(120)


def test_outputs_equal_in_process(cluster, tmp_path):
    weights = tmp_path / "mlp.safetensors"
    save_file(demo.mlp(seed=11).state_dict(), str(weights))
    cluster.start_master()
    cluster.start_workers(2, model=f"mlp=ringserve.worker.demo:mlp,weights={weights}")
    ref = demo.mlp(seed=11).eval()
    x = np.random.default_rng(0).standard_normal((32, 256), dtype=np.float32)
    with Client(cluster.frontend, timeout=10) as c:
        whole = c.infer("mlp", {"x": x})["logits"]
        rows = [f.result() for f in [c.infer_async("mlp", {"x": x[i:i + 1]}) for i in range(32)]]
        as_torch = c.infer("mlp", {"x": torch.from_numpy(x[:3])})["logits"]
        via_asyncio = asyncio.run(c.ainfer("mlp", {"x": x[:2]}))["logits"]
    with torch.inference_mode():
        expect = ref(torch.from_numpy(x))["logits"].numpy()
    np.testing.assert_allclose(whole, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([r.outputs["logits"] for r in rows]), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as_torch, expect[:3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(via_asyncio, expect[:2], rtol=1e-5, atol=1e-5)
    assert {r.worker for r in rows} == {"w0", "w1"}


def test_async_client_many_in_flight_errors_and_deadlines(cluster):
    """AsyncClient (no thread): 200 requests in flight from one loop, each answered with its own
    rows; typed errors and local deadlines as with the sync client."""
    cluster.start_master()
    cluster.start_workers(1, "--model", "slow=ringserve.worker.demo:slow,arg.delay=2", model="mlp=ringserve.worker.demo:mlp")
    x = np.random.default_rng(3).standard_normal((200, 256), dtype=np.float32)
    big = np.random.default_rng(4).standard_normal((64, 256), dtype=np.float32)  # 64 KiB: an out-of-line frame

    async def go():
        async with AsyncClient(cluster.frontend, timeout=20) as c:
            replies = await asyncio.gather(*[c.infer_reply("mlp", {"x": x[i:i + 1]}) for i in range(200)])
            whole = (await c.infer("mlp", {"x": big}))["logits"]
            with pytest.raises(UnknownModel):
                await c.infer("nope", {"x": x[:1]})
            with pytest.raises(Timeout):
                await c.infer("slow", {"x": np.ones((1, 4), np.float32)}, timeout=0.3)
            return replies, whole, c.stats

    replies, whole, stats = asyncio.run(asyncio.wait_for(go(), 60))
    with torch.inference_mode():
        ref = demo.mlp().eval()
        expect = ref(torch.from_numpy(x))["logits"].numpy()
        expect_big = ref(torch.from_numpy(big))["logits"].numpy()
    np.testing.assert_allclose(np.concatenate([r.outputs["logits"] for r in replies]), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole, expect_big, rtol=1e-5, atol=1e-5)
    assert stats.loop_errors == 0 and stats.duplicates_dropped == 0


def test_cnn_outputs_equal_in_process(cluster):
    cluster.start_master()
    cluster.start_workers(1, model="cnn=ringserve.worker.demo:cnn")
    x = np.random.default_rng(1).standard_normal((5, 1, 28, 28), dtype=np.float32)
    with Client(cluster.frontend, timeout=10) as c:
        got = c.infer("cnn", {"image": x})["logits"]
    with torch.inference_mode():
        expect = demo.cnn().eval()(torch.from_numpy(x))["logits"].numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)


def test_mdp_client_from_the_rfc(cluster, zctx):
    """A plain DEALER speaking RFC 7 client frames gets an answer (and mmi.service works)."""
    cluster.start_master()
    cluster.start_workers(1, model="echo=ringserve.worker.demo:noop")
    sock = raw_socket(zctx, zmq.DEALER, cluster.frontend)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    header = {"id": "rfc-1", "inputs": [["x", "float32", [2, 3]]]}
    sock.send_multipart([b"", b"MDPC01", b"echo", pack(header), x.tobytes()])
    empty, proto, service, body = sock.recv_multipart()
    assert (empty, proto, service) == (b"", b"MDPC01", b"echo")
    reply = unpack_map(body)
    assert reply["ok"] and reply["id"] == "rfc-1"
    (name, dtype, shape, data), = reply["outputs"]  # small tensors come back inline
    np.testing.assert_array_equal(np.frombuffer(data, dtype).reshape(shape), x)
    big = np.ones((64, 1024), np.float32)  # larger ones in a frame of their own, as sent
    sock.send_multipart([b"", b"MDPC01", b"echo", pack({"id": "rfc-2", "inputs": [["x", "float32", [64, 1024]]]}),
                         big.tobytes()])
    *_, body, data = sock.recv_multipart()
    assert unpack_map(body)["outputs"] == [["y", "float32", [64, 1024]]]
    np.testing.assert_array_equal(np.frombuffer(data, np.float32).reshape(64, 1024), big)
    # ZeroMQ RFC 8: one plain frame, "200", "404", or "501" for an mmi service that does not exist
    sock.send_multipart([b"", b"MDPC01", b"mmi.service", b"echo"])
    assert sock.recv_multipart() == [b"", b"MDPC01", b"mmi.service", b"200"]
    sock.send_multipart([b"", b"MDPC01", b"mmi.service", b"nothing"])
    assert sock.recv_multipart() == [b"", b"MDPC01", b"mmi.service", b"404"]
    sock.send_multipart([b"", b"MDPC01", b"mmi.nope", b"echo"])
    assert sock.recv_multipart() == [b"", b"MDPC01", b"mmi.nope", b"501"]


def test_admin_status_and_cli(cluster):
    import subprocess
    import sys

    cluster.start_master()
    cluster.start_workers(1, model="echo=ringserve.worker.demo:noop")
    with Client(cluster.frontend) as c:
        c.infer("echo", {"x": np.ones((1, 2), np.float32)})
    out = subprocess.run([sys.executable, "-m", "ringserve.launch.admin", "status", "--master", cluster.admin],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "w0" in out.stdout and "echo" in out.stdout
    js = subprocess.run([sys.executable, "-m", "ringserve.launch.admin", "status", "--json", "--master", cluster.admin],
                        capture_output=True, text=True, timeout=30)
    import json
    st = json.loads(js.stdout)
    assert st["models"]["echo"]["ok"] == 1 and st["workers"][0]["credit"] >= 1
    assert {"state", "heartbeat_age_s", "in_flight", "done", "device"} <= set(st["workers"][0])


@pytest.mark.parametrize("role", ["ringserve.launch.master", "ringserve.launch.worker", "ringserve.launch.admin", "ringserve.launch.local", "ringserve.launch.ps",
                                  "ringserve.launch.publish"])
def test_every_launch_script_has_help(role):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", role, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage" in out.stdout


def test_local_cluster_main_job(tmp_path):
    """The README's main job: shards, master, workers, real requests, a live delta, the status table."""
    from helpers import run_local

    rc, stdout, stderr = run_local("--requests", "4", "--workdir", str(tmp_path))
    assert rc == 0, stderr[-2000:]
    assert "mlp v2" in stdout and "WORKER" in stdout and "ERRORS" in stdout
    worst = [float(line.rsplit("=", 1)[1]) for line in stdout.splitlines() if "max |ringserve" in line]
    assert len(worst) == 3 and max(worst) < 1e-4
