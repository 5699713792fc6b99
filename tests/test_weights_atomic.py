"""Weights are all-or-nothing (issue 9): whatever the operator or a second publisher does, a
worker serves exactly one committed version, shards agree, and a bad version is refused whole."""
from __future__ import annotations

import hashlib
import json
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import zmq
from safetensors.numpy import save_file

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.client.params import ParamClient, PublishConflict, PublishError, layout_problem, tiling_problem
from ringserve.launch.procs import wait_for_workers, wait_until
from ringserve.paramserver.store import meta_checksum, sha256
from ringserve.protocol.codec import pack
from ringserve.protocol.messages import SHARD_PROTO
from ringserve.protocol.placement import parse_shards
from ringserve.worker import demo
from ringserve.worker.batching import Batcher
from ringserve.worker.compute import ComputeThread
from ringserve.worker.loader import ServedModel, WeightsRefused, check_state, layout_of, parse_model_arg
from ringserve.worker.sync import WeightSync, assemble, next_backoff
from helpers import expected, flip_a_byte, mlp_state, shard_list, version_piece_file

pytestmark = pytest.mark.timeout(150)

SMALL_CHUNK = 64 * 1024
MLP = "mlp=ringserve.worker.demo:mlp"


def served(opts: str = MLP, seed: int = 1) -> ServedModel:
    m = ServedModel(parse_model_arg(opts), torch.device("cpu"), version=1)
    m.install(m.build_shadow(mlp_state(seed)), 1)
    return m


def params_of(m: ServedModel) -> dict[str, object]:
    """Every tensor of the live module (quantized packed weights unpacked), copied."""
    out = {}
    for k, v in m.module.state_dict().items():
        if isinstance(v, tuple):  # int8 Linear: (packed weight, bias)
            v = v[0]
        if isinstance(v, torch.Tensor):
            out[k] = (v.dequantize() if v.is_quantized else v).detach().clone()
    return out


def fetch_version(pc: ParamClient, model: str, version: int) -> dict[str, np.ndarray]:
    """Everything the shards hold of a version, assembled exactly as a worker would."""
    manifests = {n: h["manifest"] for n, (h, _) in pc.rpc.call_all(
        {"cmd": "fetch", "model": model, "version": version, "manifest_only": True}).items()}
    replies = pc.rpc.call_all({"cmd": "fetch", "model": model, "version": version})
    held = assemble(manifests, replies, None)
    return {n: a.reshape(held.shapes[n]) for n, a in held.flat.items()}


def raw_call(pc: ParamClient, shard: str, header: dict, frames=()) -> dict:
    return pc.rpc.call({shard: (header, list(frames))}, raise_on_error=False)[shard][0]


def stage_header(model, version, token, pieces_arrays, digest="d"):
    items, frames = [], []
    for name, arr in pieces_arrays.items():
        flat = np.ascontiguousarray(arr.reshape(-1))
        buf = memoryview(flat).cast("B")
        items.append([name, name, flat.dtype.name, list(arr.shape), 0, flat.size, hashlib.sha256(buf).hexdigest()])
        frames.append(buf)
    return {"cmd": "stage", "model": model, "version": version, "token": token, "digest": digest,
            "pieces": items}, frames


# ------------------------------------------------------------------ item 1 + 10: the worker side
def test_check_state_names_every_problem():
    lay = layout_of(demo.mlp())
    good = mlp_state(1)
    check_state(lay, good)
    check_state(lay, {k: v.half() for k, v in good.items()})  # floats may come in another float dtype
    bad = dict(good)
    del bad["net.0.bias"]
    bad["extra.weight"] = torch.zeros(3)
    bad["net.2.weight"] = torch.zeros(4, 4)
    with pytest.raises(WeightsRefused) as exc:
        check_state(lay, bad)
    msg = str(exc.value)
    assert "missing ['net.0.bias']" in msg and "unexpected ['extra.weight']" in msg and "net.2.weight: shape" in msg
    with pytest.raises(WeightsRefused, match="dtype int64"):
        check_state(lay, {**good, "net.0.bias": torch.zeros(1024, dtype=torch.int64)})


@pytest.mark.parametrize("opts", [MLP, MLP + ",quantize=int8", MLP + ",dtype=float16"])
def test_a_version_that_does_not_fit_never_touches_the_live_module(opts):
    """Regression: load_state_dict copied matching tensors into the live module before raising."""
    m = served(opts)
    before = params_of(m)
    live = m.module
    partial = {"net.0.weight": mlp_state(2)["net.0.weight"] + 1.0}  # one tensor, as a publish without --base
    wrong = {**mlp_state(2), "net.4.bias": torch.zeros(11)}
    extra = {**mlp_state(2), "net.9.weight": torch.zeros(2)}
    for state in (partial, wrong, extra):
        with pytest.raises(WeightsRefused):
            m.build_shadow(state)
    assert m.module is live and m.version == 1
    after = params_of(m)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compute_thread_swaps_one_reference_built_off_thread():
    """Item 10: the shadow is complete (dtype, int8, device) before the compute thread sees it;
    the compute thread's swap is a reference assignment (the very object built elsewhere)."""
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        pull.bind("inproc://swap-test")
        for opts in (MLP + ",quantize=int8", MLP + ",dtype=bfloat16"):
            m = served(opts)
            shadow = m.build_shadow(mlp_state(3))
            if "int8" in opts:
                assert any(".quantized." in type(x).__module__ for x in shadow.modules())
            else:
                assert all(p.dtype == torch.bfloat16 for p in shadow.parameters())
            ct = ComputeThread(ctx, "inproc://swap-test", {"mlp": m}, Batcher(1, 0.001))
            ct.push = ctx.socket(zmq.PUSH)
            ct.push.connect("inproc://swap-test")
            ct.swaps.put(("mlp", shadow, 3))
            ct._apply_swaps()
            ct.push.close(linger=0)
            assert m.module is shadow and m.version == 3
            assert pull.poll(2000) and pull.recv_multipart() == [b"S"]
        pull.close(linger=0)
    finally:
        ctx.destroy(linger=0)


def test_worker_refuses_an_unloadable_version_keeps_serving_and_reports_it(cluster):
    eps = cluster.start_shards(2)
    cluster.start_master()
    v1, v3 = mlp_state(1), mlp_state(3)
    x = np.random.default_rng(0).standard_normal((3, 256), dtype=np.float32)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        pc.publish("mlp", v1)
        (worker,) = cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False)
        wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
        one = {"net.0.weight": (v1["net.0.weight"] + 1.0).numpy()}  # what "publish one tensor, no --base" sends
        # the operator insisted, and skipped the worker check (it would revert this: test_weights_issue16)
        assert pc.publish("mlp", one, allow_layout_change=True, check_workers=False) == 2
        admin = AdminClient(cluster.admin)

        def refused():
            info = admin.status()["workers"][0]["models"]["mlp"]
            return info if info.get("refused") else None

        info = wait_until(refused, 30, what="refusal reported")
        assert info["version"] == 1 and info["ready"] is True and info["refused"]["version"] == 2
        assert "missing" in info["refused"]["reason"] and "net.2.weight" in info["refused"]["reason"]
        with Client(cluster.frontend, timeout=10) as c:
            for _ in range(5):
                r = c.infer_async("mlp", {"x": x}).result()
                assert r.version == 1
                np.testing.assert_allclose(r.outputs["logits"], expected(v1, x), rtol=1e-5, atol=1e-6)
        out = subprocess.run([sys.executable, "-m", "ringserve.launch.admin", "status", "--master", cluster.admin],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "refused v2" in out.stdout and "REFUSED VERSIONS" in out.stdout, out.stdout
        time.sleep(2.0)  # a refused version is not fetched again
        assert worker.log_path.read_text().count("weights_refused") == 1
        assert pc.publish("mlp", v3, allow_layout_change=True) == 3  # a newer good version is taken
        wait_for_workers(cluster.admin, 1, 30, model="mlp", version=3)
        assert "refused" not in admin.status()["workers"][0]["models"]["mlp"]
        with Client(cluster.frontend, timeout=10) as c:
            np.testing.assert_allclose(c.infer("mlp", {"x": x})["logits"], expected(v3, x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ item 2: publish refusal
def test_layout_problem_is_pure():
    ref = {"a": ("float32", (2, 3)), "b": ("float32", (4,))}
    assert layout_problem({"a": ("float32", (2, 3))}, ref, delta=True, allow_new=False) is None
    assert "not in the base" in layout_problem({"c": ("float32", (1,))}, ref, True, False)
    assert layout_problem({"c": ("float32", (1,))}, ref, True, True) is None
    assert "has float32[4]" in layout_problem({"b": ("float32", (5,))}, ref, True, True)
    assert "has float32[4]" in layout_problem({"b": ("float16", (4,))}, ref, True, True)
    assert "missing ['b']" in layout_problem({"a": ("float32", (2, 3))}, ref, delta=False, allow_new=False)
    lay, problem = tiling_problem({"s0": {"a": ["float32", [10], [[0, 4]]]}, "s1": {"a": ["float32", [10], [[4, 10]]]}})
    assert problem is None and lay == {"a": ("float32", (10,))}
    assert "overlap" in tiling_problem({"s0": {"a": ["float32", [10], [[0, 6], [4, 10]]]}})[1]
    assert "cover 6 of 10" in tiling_problem({"s0": {"a": ["float32", [10], [[0, 6]]]}})[1]


def test_publishing_what_no_worker_can_load_is_refused_before_commit(cluster, tmp_path):
    eps = cluster.start_shards(2)
    v1 = mlp_state(1)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        pc.publish("mlp", v1)
        before = pc.versions("mlp")
        cases = [({"net.9.weight": np.zeros(3, np.float32)}, 1, "not in the base"),  # delta, extra key
                 ({"net.0.bias": np.zeros(7, np.float32)}, 1, "base has float32[1024]"),  # delta, wrong shape
                 ({"net.0.bias": np.zeros(1024, np.float64)}, 1, "base has float32[1024]"),  # delta, wrong dtype
                 ({k: v for k, v in v1.items() if k != "net.4.bias"}, None, "missing ['net.4.bias']")]  # full
        for tensors, base, why in cases:
            with pytest.raises(PublishError, match="refused") as exc:
                pc.publish("mlp", tensors, base=base)
            assert why in str(exc.value), str(exc.value)
        assert pc.versions("mlp") == before  # nothing committed, current unchanged
        assert pc.publish("mlp", {"net.0.bias": v1["net.0.bias"] + 1}, base=1) == 2  # a good delta still works
        assert pc.publish("mlp", {"net.9.weight": np.zeros(3, np.float32)}, base=2, allow_new=True) == 3
        # the shard checks what it can on its own too (a publisher is a peer; trust none)
        hdr, frames = stage_header("mlp", 9, "t" * 8, {"net.0.bias": np.zeros(5, np.float32)})
        hdr.update(base=1, replace={"net.0.bias": ["float32", [5]]})
        owner = next(n for n in eps if "net.0.bias" in
                     {i[1] for i in raw_call(pc, n, {"cmd": "fetch", "model": "mlp", "version": 1,
                                                     "manifest_only": True})["manifest"]})
        err = raw_call(pc, owner, hdr, frames)["error"]
        assert err["code"] == "BAD_REQUEST" and "does not match the base" in err["message"]
    bad = tmp_path / "bad.safetensors"
    save_file({"net.9.weight": np.zeros(3, np.float32)}, str(bad))
    out = subprocess.run([sys.executable, "-m", "ringserve.launch.publish", "--shards", shard_list(eps), "--model",
                          "mlp", "--weights", str(bad), "--base", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "not in the base" in out.stderr, out.stderr


# ------------------------------------------------------------------ item 3: two publishers
def test_two_publishers_of_one_version_exactly_one_wins(cluster):
    eps = cluster.start_shards(3)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        pc.publish("mlp", mlp_state(1))
    contents = {"a": mlp_state(2), "b": mlp_state(3)}
    outcome: dict[str, object] = {}
    start = threading.Barrier(2)

    def publisher(tag):
        with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as mine:
            start.wait(10)
            try:
                outcome[tag] = mine.publish("mlp", contents[tag], version=2)
            except PublishError as exc:
                outcome[tag] = exc

    threads = [threading.Thread(target=publisher, args=(t,)) for t in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [t for t, r in outcome.items() if r == 2]
    losers = [t for t, r in outcome.items() if isinstance(r, PublishConflict)]
    assert len(winners) == 1 and len(losers) == 1, outcome
    assert outcome[losers[0]].code == "CONFLICT"
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        assert {s["current"] for s in pc.versions("mlp").values()} == {2}
        got = fetch_version(pc, "mlp", 2)  # all of the winner's, nothing of the loser's
        for k, v in contents[winners[0]].items():
            np.testing.assert_array_equal(got[k], v.numpy())
        with pytest.raises(PublishConflict):  # re-publishing v2 with other content is refused, not dropped
            pc.publish("mlp", mlp_state(4), version=2)
        assert pc.publish("mlp", contents[winners[0]], version=2) == 2  # the same content again is fine


def test_interleaved_stages_never_blend(cluster):
    eps = cluster.start_shards(1)
    a, b = np.ones(8, np.float32), np.full(8, 2, np.float32)
    with ParamClient(eps) as pc:
        ha, fa = stage_header("m", 1, "tok-a", {"w": a, "v": a}, digest="da")
        hb, fb = stage_header("m", 1, "tok-b", {"w": b}, digest="db")
        assert raw_call(pc, "ps0", ha, fa)["ok"] and raw_call(pc, "ps0", hb, fb)["ok"]
        commit = {"cmd": "commit", "model": "m", "version": 1}
        assert raw_call(pc, "ps0", {**commit, "token": "tok-a", "digest": "da"})["ok"]
        err = raw_call(pc, "ps0", {**commit, "token": "tok-b", "digest": "db"})
        assert err["error"]["code"] == "CONFLICT"
        got = fetch_version(pc, "m", 1)
        np.testing.assert_array_equal(got["w"], a)
        np.testing.assert_array_equal(got["v"], a)


# ------------------------------------------------------------------ item 4: delta chunked differently
def test_delta_chunked_differently_from_its_base_is_merged_by_parameter(cluster):
    eps = cluster.start_shards(3)
    cluster.start_master()
    v1 = mlp_state(1)
    v2 = dict(v1)
    v2["net.2.weight"] = v1["net.2.weight"] * 0.5
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        pc.publish("mlp", v1)
    cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False)
    wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK // 4) as pc:
        assert pc.publish("mlp", {"net.2.weight": v2["net.2.weight"]}, base=1) == 2
        keys = [i[0] for h, _ in pc.rpc.call_all({"cmd": "fetch", "model": "mlp", "version": 2,
                                                  "manifest_only": True}).values() for i in h["manifest"]
                if i[1] == "net.2.weight"]
        # no stale base chunks; each piece on its 2 owners (--replicas defaults to 2 with 3 shards)
        assert len(keys) == 2 * len(set(keys)) == 2 * 1024 * 1024 * 4 // (SMALL_CHUNK // 4)
        got = fetch_version(pc, "mlp", 2)
        for k, v in v2.items():
            np.testing.assert_array_equal(got[k], v.numpy())
    wait_for_workers(cluster.admin, 1, 30, model="mlp", version=2)
    x = np.random.default_rng(5).standard_normal((2, 256), dtype=np.float32)
    with Client(cluster.frontend, timeout=10) as c:
        np.testing.assert_allclose(c.infer("mlp", {"x": x})["logits"], expected(v2, x), rtol=1e-5, atol=1e-6)


def test_fetch_failures_back_off_and_unassemblable_versions_are_refused():
    assert [round(next_backoff(b), 2) for b in (None, 0.5, 1.0, 16.0, 30.0)] == [0.5, 1.0, 2.0, 30.0, 30.0]
    p = lambda key, start, stop: [key, "w", "float32", [8], start, stop, "0" * 64]  # noqa: E731
    with pytest.raises(ValueError, match="do not tile"):  # overlapping chunks from two layouts
        assemble({"s0": [p("w#0", 0, 4), p("w#1", 4, 8)], "s1": [p("w#7", 2, 6)]}, {}, None)


# ------------------------------------------------------------------ item 7: never block on a send
def test_a_peer_that_does_not_read_cannot_freeze_the_shard(cluster):
    eps = cluster.start_shards(1)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=5) as pc:
        pc.publish("mlp", mlp_state(1))
        key = next(i[0] for i in raw_call(pc, "ps0", {"cmd": "fetch", "model": "mlp", "version": 1,
                                                      "manifest_only": True})["manifest"] if i[5] - i[4] > 10_000)
        ctx = zmq.Context()
        try:
            greedy = ctx.socket(zmq.DEALER)
            greedy.setsockopt(zmq.LINGER, 0)
            greedy.setsockopt(zmq.RCVHWM, 1)
            greedy.setsockopt(zmq.RCVBUF, 4096)
            greedy.setsockopt(zmq.SNDHWM, 100_000)
            greedy.connect(eps["ps0"])
            req = pack({"cmd": "fetch", "model": "mlp", "version": 1, "keys": [key], "rid": 1})
            sent = 0
            for _ in range(4000):  # never reads a reply
                try:
                    greedy.send_multipart([SHARD_PROTO, req], zmq.NOBLOCK)
                    sent += 1
                except zmq.Again:
                    break
            assert sent > 2000
            time.sleep(2.0)
            hello = pc.hello(timeout=5)["ps0"]  # anyone else is still answered
            assert hello["ok"]
            wait_until(lambda: pc.hello(timeout=5)["ps0"]["replies_dropped"] > 0, 20, what="replies dropped")
            shard = cluster.shards["ps0"]
            shard.signal(signal.SIGTERM)
            assert shard.wait(10) is not None  # and it still stops when told
            greedy.close(linger=0)
        finally:
            ctx.destroy(linger=0)


# ------------------------------------------------------------------ item 5: names the store cannot hold
def test_reserved_names_refused_at_stage_and_shard_starts_on_bad_data(cluster):
    data = cluster.tmp / "ps0" / "mlp"
    data.mkdir(parents=True)
    payload = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"  # a safetensors header that cannot be parsed
    manifest = {"model": "mlp", "version": 1, "file_sha256": sha256(payload), "digest": "x", "pieces": []}
    manifest["meta_sha256"] = meta_checksum(manifest)
    (data / "v1.safetensors").write_bytes(payload)
    (data / "v1.manifest.json").write_text(json.dumps(manifest))
    (data / "vX.manifest.json").write_text("{")
    (data / "v2.manifest.json").write_text("{not json")
    (data / "current.json").write_text("[1]")
    eps = cluster.start_shards(1)
    with ParamClient(eps) as pc:
        hello = pc.hello()["ps0"]
        assert set(hello["corrupt"]["mlp"]) == {"1", "2"} and hello["current"] == {}
        for name in ("__metadata__", "", "a#b", "x" * 600):
            hdr, frames = stage_header("m", 1, "tok", {"ok": np.zeros(2, np.float32)})
            hdr["pieces"][0][0] = hdr["pieces"][0][1] = name
            err = raw_call(pc, "ps0", hdr, frames)["error"]
            assert err["code"] == "BAD_REQUEST" and "cannot be stored" in err["message"], (name, err)
        hdr, frames = stage_header("m", 1, "tok", {"ok": np.zeros(2, np.float32)})
        hdr["pieces"][0][2] = "object"
        assert raw_call(pc, "ps0", hdr, frames)["error"]["code"] == "BAD_REQUEST"
        with pytest.raises(PublishError):
            pc.publish("m", {"__metadata__": np.zeros(2, np.float32)})
        assert pc.publish("m", {"w": np.zeros(2, np.float32)}) == 1
    shard = cluster.shards["ps0"]
    where = {"ps0": dict(shard.info)}
    shard.stop()
    cluster.start_shards(1, endpoints=where)  # it starts again on the same data dir, with what it committed
    with ParamClient(eps) as pc:
        assert pc.hello()["ps0"]["current"] == {"m": 1}


# ------------------------------------------------------------------ item 6: staging is bounded
def test_staging_is_bounded_in_bytes_and_time(cluster):
    shard = cluster._start("ringserve.launch.ps", ["--name", "ps0", "--data-dir", str(cluster.tmp / "ps0"),
                                                   "--max-staging-mb", "1", "--staging-ttl", "1.5",
                                                   "--announce-interval", "0.2", "--bind", "tcp://127.0.0.1:*"],
                           "ps0")
    eps = {"ps0": shard.info["endpoint"]}
    big = np.ones(100_000, np.float32)  # 400 kB per stage
    with ParamClient(eps) as pc:
        for i in range(2):
            hdr, frames = stage_header("m", 1, f"tok{i}", {"w": big})
            assert raw_call(pc, "ps0", hdr, frames)["ok"]
        hdr, frames = stage_header("m", 1, "tok2", {"w": big})
        err = raw_call(pc, "ps0", hdr, frames)["error"]
        assert err["code"] == "OVERLOADED" and "staging area full" in err["message"]
        assert pc.hello()["ps0"]["staging"]["bytes"] == 800_000
        wait_until(lambda: pc.hello()["ps0"]["staging"]["stages"] == 0, 20, what="stages expired")
        assert raw_call(pc, "ps0", hdr, frames)["ok"]
    assert "stage_expired" in shard.log_path.read_text()


# ------------------------------------------------------------------ item 8: agreement, manifest, fallback
def test_a_commit_landing_after_the_publisher_gave_up_is_undone(cluster):
    eps = cluster.start_shards(2)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=2.0) as pc:
        pc.publish("mlp", mlp_state(1))
        slow = cluster.shards["ps1"]  # not the arbiter (ps0 commits first)
        real_call = pc.rpc.call

        def call(requests, timeout=None, raise_on_error=True, **kw):
            if any(h.get("cmd") == "commit" for h, _ in requests.values()) and "ps1" in requests:
                slow.signal(signal.SIGSTOP)  # ps1 got its stage; its commit will land late
            return real_call(requests, timeout, raise_on_error, **kw)

        pc.rpc.call = call
        wake = threading.Timer(5.0, slow.signal, args=(signal.SIGCONT,))  # back while the publisher reverts
        wake.start()
        try:
            with pytest.raises(PublishError, match="failed to commit"):
                pc.publish("mlp", mlp_state(2))
        finally:
            wake.join(10)
            slow.signal(signal.SIGCONT)
            pc.rpc.call = real_call
        def agreed():
            return all(s == {"versions": [1], "current": 1} for s in pc.versions("mlp").values())

        wait_until(agreed, 30, 0.2, what="shards agree on v1")
        time.sleep(1.0)
        assert all(s == {"versions": [1], "current": 1} for s in pc.versions("mlp").values())


def test_manifest_is_checksummed_and_corrupt_current_falls_back_to_its_predecessor(cluster):
    eps = cluster.start_shards(2)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        for seed in (1, 2, 3):
            pc.publish("mlp", mlp_state(seed))
        pc.rollback("mlp", 2)  # v3 rolled back on purpose
    shard = cluster.shards["ps0"]
    where = {"ps0": dict(shard.info)}
    shard.stop()
    d = cluster.tmp / "ps0" / "mlp"
    m1 = json.loads((d / "v1.manifest.json").read_text())
    m1["pieces"][0][3] = [7]  # an edited shape: the piece checksums still match
    (d / "v1.manifest.json").write_text(json.dumps(m1))
    flip_a_byte(version_piece_file(d, 2))
    cluster.start_shards(1, endpoints=where)
    with ParamClient(eps, timeout=3.0) as pc:
        hello = pc.hello()["ps0"]
        assert "manifest fails its own checksum" in hello["corrupt"]["mlp"]["1"]
        assert hello["current"].get("mlp") is None  # not v3, which was rolled back on purpose; v1 is corrupt
        assert hello["fallback"]["mlp"]["from"] == 2 and hello["fallback"]["mlp"]["to"] is None


def test_corrupt_current_falls_back_to_the_version_current_before_it(cluster):
    eps = cluster.start_shards(1)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        for seed in (1, 2, 3):
            pc.publish("mlp", mlp_state(seed))
        pc.rollback("mlp", 2)
    where = {"ps0": dict(cluster.shards["ps0"].info)}
    cluster.shards["ps0"].stop()
    d = cluster.tmp / "ps0" / "mlp"
    flip_a_byte(version_piece_file(d, 2))
    cluster.start_shards(1, endpoints=where)
    with ParamClient(eps, timeout=3.0) as pc:
        hello = pc.hello()["ps0"]
        assert hello["current"]["mlp"] == 1 and hello["fallback"]["mlp"]["to"] == 1
        assert "checksum mismatch" in hello["fallback"]["mlp"]["why"]


# ------------------------------------------------------------------ item 9: follow a moved PUB
def test_weight_sync_follows_a_shard_restarted_on_a_new_pub_port(cluster):
    eps = cluster.start_shards(2)
    model = ServedModel(parse_model_arg(MLP), torch.device("cpu"), wait_for_weights=True)
    swaps: queue.Queue = queue.Queue()
    ctx = zmq.Context()
    sync = WeightSync(ctx, parse_shards(shard_list(eps)), {"mlp": model}, swaps, timeout=5.0, resync_s=1000.0)
    sync.start()
    try:
        with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=5.0) as pc:
            pc.publish("mlp", mlp_state(1))
            assert swaps.get(timeout=30)[2] == 1
            old = cluster.shards["ps1"]
            endpoint, old_pub = old.info["endpoint"], old.info["pub"]
            old.signal(signal.SIGKILL)
            old.wait(5)
            back = cluster._start("ringserve.launch.ps", ["--name", "ps1", "--data-dir", str(cluster.tmp / "ps1"),
                                                          "--bind", endpoint, "--pub", "tcp://127.0.0.1:*",
                                                          "--announce-interval", "0.2"], "ps1-moved")
            assert back.info["pub"] != old_pub
            wait_until(lambda: sync.views["ps1"].known and sync.views["ps1"].pub == back.info["pub"], 30,
                       what="snapshot of the restarted shard")
            pc.publish("mlp", mlp_state(2))
            assert swaps.get(timeout=30)[2] == 2
            snapshots = sync.snapshots["ps1"]
            pc.rollback("mlp", 1)  # heard on the new PUB: no snapshot needed
            assert swaps.get(timeout=30)[2] == 1
            time.sleep(4.0)  # its heartbeats are heard too: it never goes silent (no snapshot)
            assert sync.snapshots["ps1"] == snapshots and sync.views["ps1"].known
    finally:
        sync.stopping.set()
        sync.join(10)
        ctx.destroy(linger=0)


def test_a_fetch_longer_than_the_silence_limit_costs_no_resync(cluster, monkeypatch):
    """While the sync thread fetches it reads no announcement; the heartbeats the shards sent
    meanwhile wait in the SUB. A fetch longer than the silence limit must not make it take every
    shard for silent (a snapshot of each, and the commit digests forgotten: seen after the bench's
    2 s fetches under load)."""
    import ringserve.worker.sync as sync_mod
    monkeypatch.setattr(sync_mod, "SILENCE_MIN_S", 0.3)  # limit: max(5 x 0.2 s, 0.3 s) = 1 s
    real = sync_mod.fetch_into

    def slow_fetch(*args, **kw):
        time.sleep(1.6)
        return real(*args, **kw)

    monkeypatch.setattr(sync_mod, "fetch_into", slow_fetch)
    eps = cluster.start_shards(2)
    model = ServedModel(parse_model_arg(MLP), torch.device("cpu"), wait_for_weights=True)
    swaps: queue.Queue = queue.Queue()
    ctx = zmq.Context()
    sync = WeightSync(ctx, parse_shards(shard_list(eps)), {"mlp": model}, swaps, timeout=5.0, resync_s=1000.0,
                      prefetch=False)
    sync.start()
    try:
        with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=5.0) as pc:
            wait_until(lambda: all(v.known for v in sync.views.values()), 30, what="snapshots")
            time.sleep(0.5)
            snapshots = dict(sync.snapshots)
            pc.publish("mlp", mlp_state(1), check_workers=False)
            assert swaps.get(timeout=30)[2] == 1
            time.sleep(0.5)  # the loop has turned after the fetch
            assert sync.snapshots == snapshots and all(v.known for v in sync.views.values())
    finally:
        sync.stopping.set()
        sync.join(10)
        ctx.destroy(linger=0)
