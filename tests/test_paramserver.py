"""Parameter servers on real processes: publish, live swap, delta, failures, durability, rollback."""
from __future__ import annotations

import signal
from collections import Counter

import numpy as np
import pytest

from ringserve.client import Client, UnknownVersion
from ringserve.client.admin import AdminClient
from ringserve.client.params import ParamClient, PublishError, changed_tensors
from ringserve.launch.procs import wait_for_workers, wait_until
from ringserve.protocol.placement import owner, place, plan, ring
from helpers import expected, flip_a_byte, mlp_state, shard_list, version_piece_file

pytestmark = pytest.mark.timeout(150)

SMALL_CHUNK = 64 * 1024  # so the MLP's big matrices spread over several shards


def start(cluster, shards=4):
    eps = cluster.start_shards(shards)
    cluster.start_master()
    return eps


def start_workers(cluster, eps, count=2, wait_version=None):
    cluster.start_workers(count, "--paramservers", shard_list(eps), "--max-batch-size", "4", wait=False)
    if wait_version is not None:
        wait_for_workers(cluster.admin, len(cluster.workers), 60, model="mlp", version=wait_version)


def test_ring_moves_a_fifth_and_every_role_agrees():
    keys = [f"layer{i}.weight#{k}" for i in range(400) for k in range(5)]
    four = {k: owner(k, ["a", "b", "c", "d"]) for k in keys[:50]}
    r4, r5 = ring(["a", "b", "c", "d"]), ring(["e", "d", "c", "b", "a"])  # order must not matter
    moved = sum(1 for k in keys if r4.get_node(k) != r5.get_node(k))
    assert abs(moved / len(keys) - 1 / 5) < 0.07, moved / len(keys)
    assert all(r5.get_node(k) == "e" for k in keys if r4.get_node(k) != r5.get_node(k))
    assert four == {k: ring(["d", "c", "b", "a"]).get_node(k) for k in keys[:50]}
    pieces = plan({"emb": ("float32", (4096, 64), 4)}, chunk_bytes=SMALL_CHUNK)
    assert len(pieces) == 16 and len({s for s, ps in place(pieces, "abcd").items() if ps}) > 1


def test_publish_v1_then_live_swap_to_v2_under_load(cluster):
    eps = start(cluster)
    v1, v2 = mlp_state(1), mlp_state(2)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        assert pc.publish("mlp", v1) == 1
        start_workers(cluster, eps, wait_version=1)
        x = np.random.default_rng(0).standard_normal((64, 256), dtype=np.float32)
        e1, e2 = expected(v1, x), expected(v2, x)
        with Client(cluster.frontend, timeout=20) as c:
            first = c.infer_async("mlp", {"x": x[:8]}).result()
            assert first.version == 1
            np.testing.assert_allclose(first.outputs["logits"], e1[:8], rtol=1e-4, atol=1e-5)
            seen, failures, published = Counter(), 0, False
            inflight = []
            i = 0
            for _ in range(3000):  # keep 32 in flight, publish v2 in the middle, stop once all is v2
                while len(inflight) < 32:
                    inflight.append((i % 64, c.infer_async("mlp", {"x": x[i % 64:i % 64 + 1]})))
                    i += 1
                row, f = inflight.pop(0)
                try:
                    r = f.result()
                except Exception:
                    failures += 1
                    continue
                exp = {1: e1, 2: e2}[r.version]  # labelled with the version that produced it
                np.testing.assert_allclose(r.outputs["logits"][0], exp[row], rtol=1e-4, atol=1e-5)
                seen[r.version] += 1
                if not published and seen[1] >= 100:
                    assert pc.publish("mlp", v2) == 2
                    published = True
                    since = seen[2]
                if published and seen[2] - since >= 200:
                    break
            for _, f in inflight:
                f.result()
            assert failures == 0 and seen[1] >= 100 and seen[2] >= 200
            after = [c.infer_async("mlp", {"x": x[:1]}).result() for _ in range(20)]
            assert {r.version for r in after} == {2}
        st = AdminClient(cluster.admin).status()
        assert {w["models"]["mlp"]["version"] for w in st["workers"]} == {2}


def test_delta_equals_full_publish_and_rollback_and_pinning(cluster):
    eps = start(cluster)
    base = mlp_state(1)
    changed = dict(base)
    changed["net.2.bias"] = base["net.2.bias"] + 0.5
    x = np.random.default_rng(1).standard_normal((4, 256), dtype=np.float32)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        pc.publish("mlp", base)
        start_workers(cluster, eps, count=1, wait_version=1)
        delta = changed_tensors(changed, base)
        assert list(delta) == ["net.2.bias"]
        assert pc.publish("mlp", delta, base=1) == 2
        wait_for_workers(cluster.admin, 1, 30, model="mlp", version=2)
        with Client(cluster.frontend, timeout=10) as c:
            via_delta = c.infer("mlp", {"x": x})["logits"]
            np.testing.assert_allclose(via_delta, expected(changed, x), rtol=1e-4, atol=1e-5)
            assert pc.publish("mlp", changed) == 3  # the same weights as a full publish
            wait_for_workers(cluster.admin, 1, 30, model="mlp", version=3)
            np.testing.assert_allclose(c.infer("mlp", {"x": x})["logits"], via_delta, rtol=0, atol=0)
            reply = c.infer_async("mlp", {"x": x}, version=3).result()
            assert reply.version == 3
            with pytest.raises(UnknownVersion):
                c.infer("mlp", {"x": x}, version=1)
            pc.rollback("mlp", 1)  # admin rollback: shards announce v1, workers swap back
            wait_for_workers(cluster.admin, 1, 30, model="mlp", version=1)
            np.testing.assert_allclose(c.infer("mlp", {"x": x})["logits"], expected(base, x), rtol=1e-4, atol=1e-5)


def test_publish_with_a_shard_down_fails_cleanly(cluster):
    eps = start(cluster, shards=3)
    v1 = mlp_state(1)
    x = np.random.default_rng(2).standard_normal((2, 256), dtype=np.float32)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=2.0) as pc:
        pc.publish("mlp", v1)
        start_workers(cluster, eps, count=1, wait_version=1)
        down = cluster.shards["ps1"]
        info = dict(down.info)
        down.signal(signal.SIGKILL)
        down.wait(5)
        with pytest.raises(PublishError, match="ps1"):
            pc.publish("mlp", mlp_state(2))
        with Client(cluster.frontend, timeout=10) as c:
            r = c.infer_async("mlp", {"x": x}).result()
            assert r.version == 1
            np.testing.assert_allclose(r.outputs["logits"], expected(v1, x), rtol=1e-4, atol=1e-5)
        cluster._start("ringserve.launch.ps", ["--name", "ps1", "--data-dir", str(cluster.tmp / "ps1"), "--bind",
                                     info["endpoint"], "--pub", info["pub"], "--announce-interval", "0.2"],
                       "ps1-back")
        v2 = mlp_state(2)
        assert pc.publish("mlp", v2) == 2  # with the shard back, publishing succeeds
        wait_for_workers(cluster.admin, 1, 30, model="mlp", version=2)
        with Client(cluster.frontend, timeout=10) as c:
            np.testing.assert_allclose(c.infer("mlp", {"x": x})["logits"], expected(v2, x), rtol=1e-4, atol=1e-5)


def test_shard_restart_keeps_versions_and_refuses_corruption(cluster):
    eps = start(cluster, shards=2)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        pc.publish("mlp", mlp_state(1))
        pc.publish("mlp", mlp_state(2))
    shard = cluster.shards["ps0"]
    info = dict(shard.info)
    shard.signal(signal.SIGKILL)
    shard.wait(5)
    restarted = cluster._start("ringserve.launch.ps", ["--name", "ps0", "--data-dir", str(cluster.tmp / "ps0"),
                                             "--bind", info["endpoint"], "--pub", info["pub"],
                                             "--announce-interval", "0.2"], "ps0-restarted")
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        assert pc.versions("mlp")["ps0"] == {"versions": [1, 2], "current": 2}
        start_workers(cluster, eps, count=1, wait_version=2)  # a new worker loads the latest version
        x = np.random.default_rng(3).standard_normal((2, 256), dtype=np.float32)
        with Client(cluster.frontend, timeout=10) as c:
            np.testing.assert_allclose(c.infer("mlp", {"x": x})["logits"], expected(mlp_state(2), x),
                                       rtol=1e-4, atol=1e-5)
        restarted.signal(signal.SIGKILL)
        restarted.wait(5)
        flip_a_byte(version_piece_file(cluster.tmp / "ps0" / "mlp", 2))
        cluster._start("ringserve.launch.ps", ["--name", "ps0", "--data-dir", str(cluster.tmp / "ps0"), "--bind",
                                     info["endpoint"], "--pub", info["pub"], "--announce-interval", "0.2"],
                       "ps0-corrupt")
        hello = pc.hello()["ps0"]
        assert hello["versions"]["mlp"] == [1] and "checksum mismatch" in hello["corrupt"]["mlp"]["2"]
        reply = pc.rpc.call({"ps0": ({"cmd": "fetch", "model": "mlp", "version": 2}, [])}, raise_on_error=False)
        err = reply["ps0"][0]["error"]
        assert err["code"] == "CORRUPT" and "checksum mismatch" in err["message"]


def test_worker_without_weights_waits_for_a_version_and_cli_rollback(cluster):
    import subprocess
    import sys

    eps = start(cluster, shards=2)
    start_workers(cluster, eps, count=1)
    admin = AdminClient(cluster.admin)
    st = wait_until(lambda: admin.status()["workers"], 30, what="worker registered")
    assert st[0]["models"]["mlp"]["ready"] is False and st[0]["models"]["mlp"]["version"] is None
    x = np.random.default_rng(4).standard_normal((1, 256), dtype=np.float32)
    with Client(cluster.frontend, timeout=30) as c:
        queued = c.infer_async("mlp", {"x": x})  # waits in the master's queue: nobody is ready
        with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
            pc.publish("mlp", mlp_state(1))
            pc.publish("mlp", mlp_state(2))
        assert queued.result().version in (1, 2)
        wait_for_workers(cluster.admin, 1, 30, model="mlp", version=2)
        out = subprocess.run([sys.executable, "-m", "ringserve.launch.admin", "rollback", "--shards", shard_list(eps),
                              "--model", "mlp", "--version", "1"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        wait_for_workers(cluster.admin, 1, 30, model="mlp", version=1)
        assert c.infer_async("mlp", {"x": x}).result().version == 1


def test_shard_answers_only_its_commands(cluster):
    eps = cluster.start_shards(1)
    with ParamClient(eps, timeout=5) as pc:
        for cmd in ("message", "run", "explode"):  # "message" must not reach on_message
            reply = pc.rpc.call_all({"cmd": cmd}, raise_on_error=False)["ps0"][0]
            assert reply["error"]["code"] == "BAD_REQUEST" and "unknown command" in reply["error"]["message"]
        assert pc.hello()["ps0"]["ok"]
