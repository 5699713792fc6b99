"""Issue 16, items 12, 21 and the shard part of 23, on real shards, workers and publishers:
a revert or a rollback always finds the version it needs; a version no live worker can load is
refused even when forced; a worker started on a refused current serves the newest version it
can load; a worker says what it is doing while it loads and exits at once after SIGTERM; a
publish shows its progress; a shard answers BAD_REQUEST to names and dtypes it cannot hold."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.client.params import ParamClient, PublishError, PublishRefused
from ringserve.launch.procs import RoleProcess, wait_for_workers, wait_until
from ringserve.paramserver.followers import Followers, parse_report
from ringserve.paramserver.store import prunable
from ringserve.protocol.messages import ProtocolError
from ringserve.protocol.placement import dtype_problem, model_name_problem
from helpers import expected, mlp_state, shard_list

pytestmark = pytest.mark.timeout(150)

SMALL_CHUNK = 64 * 1024
MLP = "mlp=ringserve.worker.demo:mlp"


def publish_cli(eps, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringserve.launch.publish", "--shards", shard_list(eps),
                           "--model", "mlp", *args], capture_output=True, text=True, timeout=120)


def unloadable(tmp_path) -> str:
    """One tensor of the MLP: what "publish one tensor, no --base" sends; no worker can load it."""
    path = tmp_path / "one.safetensors"
    save_file({"net.0.weight": (mlp_state(9)["net.0.weight"] + 1.0).numpy()}, str(path))
    return str(path)


def states(pc: ParamClient) -> dict:
    return {n: (s["versions"], s["current"]) for n, s in pc.versions("mlp").items()}


# ------------------------------------------------------------------ item 12: nothing a revert needs is pruned
def test_prunable_never_takes_the_current_or_the_previous_current():
    assert prunable([1, 2, 3, 4], 3, {4, 3}) == [1]
    assert prunable([1, 2, 3, 4], 3, {4, 1}) == []  # after a rollback to the oldest, then a commit
    assert prunable([1, 2, 3, 4, 5], 3, {5, 1}) == [2]
    assert prunable([1, 2], 1, {2, 1}) == [] and prunable([1, 2, 3], 1, {3, 2}) == [1]


def test_a_failed_commit_after_a_rollback_to_the_oldest_version_keeps_it_current(cluster):
    """Regression: the commit that landed on ps0 pruned v1 (the oldest kept, current after the
    rollback), so the revert left ps0 with no current version while the publisher said "the
    previous version stays current"."""
    eps = cluster.start_shards(2)  # --keep 3
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        for seed in (1, 2, 3):
            pc.publish("mlp", mlp_state(seed))
        pc.rollback("mlp", 1)
        real_call = pc.rpc.call

        def call(requests, timeout=None, raise_on_error=True, **kw):
            commit = requests.get("ps1", ({}, []))[0]
            if commit.get("cmd") == "commit":  # ps1 loses its stage just before its commit: it fails there
                real_call({"ps1": ({**commit, "cmd": "abort"}, [])})
            return real_call(requests, timeout, raise_on_error, **kw)

        pc.rpc.call = call
        try:
            with pytest.raises(PublishError, match="failed to commit") as exc:
                pc.publish("mlp", mlp_state(4))
        finally:
            pc.rpc.call = real_call
        assert states(pc) == {"ps0": ([1, 2, 3], 1), "ps1": ([1, 2, 3], 1)}
        assert "the previous version v1 stays current" in str(exc.value), str(exc.value)
        pc.rollback("mlp", 3)  # and every kept version can still be made current
        assert {c for _, c in states(pc).values()} == {3}


@pytest.mark.timeout(300)  # three publish CLIs, a refused publish's revert, two worker checks: >150 s on a busy machine
def test_a_version_no_live_worker_loads_is_refused_even_when_forced(cluster, tmp_path):
    """Regression: forced with --allow-layout-change it exited 0, became current and pushed v1
    (what the workers serve) out with --keep 3, so the rollback that would repair it failed."""
    eps = cluster.start_shards(2)
    cluster.start_master()
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=5.0) as pc:
        for seed in (1, 2, 3):
            pc.publish("mlp", mlp_state(seed))
        pc.rollback("mlp", 1)
        cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False)
        wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
        bad = unloadable(tmp_path)
        out = publish_cli(eps, "--weights", bad, "--allow-layout-change")
        assert out.returncode == 1, (out.returncode, out.stderr)
        assert "refused" in out.stderr and "every live worker" in out.stderr and "w0" in out.stderr, out.stderr
        assert states(pc) == {"ps0": ([1, 2, 3], 1), "ps1": ([1, 2, 3], 1)}  # reverted: nothing changed
        out = publish_cli(eps, "--weights", bad, "--allow-layout-change", "--no-worker-check")
        assert out.returncode == 0, out.stderr
        forced = json.loads(out.stdout)["version"]
        # v4 again once the worker forgot its refusal (no shard holds v4), else v5: never one it would not load
        assert forced in (4, 5)
        assert all(c == forced and 1 in vs for vs, c in states(pc).values())  # v1, current before, is kept
        info = wait_until(lambda: AdminClient(cluster.admin).status()["workers"][0]["models"]["mlp"].get("refused"),
                          30, what="the forced version refused")
        assert info["version"] == forced
        out = subprocess.run([sys.executable, "-m", "ringserve.launch.publish", "--shards", shard_list(eps),
                              "--model", "mlp", "--rollback", "1"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert {c for _, c in states(pc).values()} == {1}
        with pytest.raises(PublishRefused):  # the Python API refuses the same way
            pc.publish("mlp", {"net.0.weight": mlp_state(9)["net.0.weight"]}, allow_layout_change=True)
        good = pc.publish("mlp", mlp_state(6))  # a good one is accepted (and waited for)
        assert good > forced
        # the publisher waited on the shards' follower reports; the master hears of it on the
        # worker's next heartbeat, a separate channel, so its view may trail by a beat
        wait_until(lambda: good in _served(AdminClient(cluster.admin).status()["workers"][0]["models"]["mlp"]),
                   30, what=f"the master to list v{good} on the worker")


def _served(info: dict) -> set:
    """The versions a worker's status says it serves: its current one and any kept beside it."""
    return {info.get("version"), *info.get("versions", ())}


def test_a_worker_started_on_a_refused_current_serves_the_newest_version_it_can_load(cluster, tmp_path):
    """Regression: a worker started while the current version was one it refuses stayed not
    ready for good. Also item 21: each step of loading and syncing is logged."""
    eps = cluster.start_shards(2)
    cluster.start_master()
    v1 = mlp_state(1)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=5.0) as pc:
        pc.publish("mlp", v1)
        pc.publish("mlp", {"net.0.weight": v1["net.0.weight"] + 1}, allow_layout_change=True, check_workers=False)
        assert {c for _, c in states(pc).values()} == {2}
        (worker,) = cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False)
        wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
        info = AdminClient(cluster.admin).status()["workers"][0]["models"]["mlp"]
        assert info["ready"] is True and info["version"] == 1 and info["refused"]["version"] == 2, info
        x = np.random.default_rng(0).standard_normal((2, 256), dtype=np.float32)
        with Client(cluster.frontend, timeout=10) as c:
            r = c.infer_async("mlp", {"x": x}).result()
            assert r.version == 1
            np.testing.assert_allclose(r.outputs["logits"], expected(v1, x), rtol=1e-5, atol=1e-6)
        # a good new version (checked against what workers load, not the bad current's layout) is taken
        assert pc.publish("mlp", mlp_state(3), allow_layout_change=True) == 3
        wait_for_workers(cluster.admin, 1, 30, model="mlp", version=3)
    events = [json.loads(line)["event"] for line in worker.log_path.read_text().splitlines()
              if line.startswith("{")]
    steps = ["worker_starting", "model_building", "model_built", "worker_waiting_for_weights", "weight_sync_started",
             "shard_snapshot", "weights_fetch_started", "weights_manifest_fetched", "weights_pieces_fetched",
             "weights_refused", "weights_fallback", "weights_fetch_started", "weights_manifest_fetched",
             "weights_pieces_fetched", "weights_built", "weights_swapped"]
    it = iter(events)
    missing = [s for s in steps if s not in it]  # each step, in this order
    assert not missing, (missing, events)


# ------------------------------------------------------------------ item 21: a prompt exit, a visible publish
SLOW_TEARDOWN = '''
import atexit, time
from ringserve.worker import demo

def mlp(**kw):
    atexit.register(time.sleep, 60)  # what a slow interpreter teardown costs, exaggerated
    return demo.mlp(**kw)
'''


def test_a_worker_exits_once_its_work_is_done_not_after_the_interpreter_teardown(cluster, tmp_path):
    """Regression: a worker done 60 ms after SIGTERM took ~3.5 s more to exit (the interpreter
    finalizing torch and the model's modules). Its exit must not wait for that teardown."""
    (tmp_path / "slowbye.py").write_text(SLOW_TEARDOWN)
    cluster.start_master()
    worker = RoleProcess("ringserve.launch.worker", ["--master", cluster.master.info["backend"], "--name", "w0",
                                                      "--threads", "1", "--heartbeat-interval", "0.2",
                                                      "--model", "mlp=slowbye:mlp"],
                         tmp_path / "w0.log", wait_ready=False, env={"PYTHONPATH": str(tmp_path)})
    cluster.procs.append(worker)
    worker.wait_ready(90)
    wait_for_workers(cluster.admin, 1, 60)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.tail_log()  # the 60 s teardown would still be running
    assert "worker_closed" in worker.log_path.read_text()


def test_publish_shows_bytes_sent_per_shard_on_request_and_not_in_a_pipe(cluster, tmp_path):
    eps = cluster.start_shards(2)
    path = tmp_path / "v1.safetensors"
    save_file({k: v.numpy() for k, v in mlp_state(1).items()}, str(path))
    out = publish_cli(eps, "--weights", str(path), "--chunk-bytes", str(SMALL_CHUNK), "--progress")
    assert out.returncode == 0, out.stderr
    shown = [line for line in out.stderr.splitlines() if line.startswith("sent ")]  # "\r" reads as a newline here
    assert shown, out.stderr
    last = shown[-1]
    total = 2 * sum(v.numel() * 4 for v in mlp_state(1).values()) / 1e6  # on both shards (--replicas 2)
    assert last.startswith(f"sent {total:.1f} of {total:.1f} MB") and "ps0 " in last and "ps1 " in last, last
    out = publish_cli(eps, "--weights", str(path), "--chunk-bytes", str(SMALL_CHUNK))  # stderr is a pipe
    assert out.returncode == 0 and "sent " not in out.stderr, out.stderr


# ------------------------------------------------------------------ item 23: names and dtypes a shard cannot hold
def test_model_names_and_dtypes_are_checked_in_one_place():
    assert model_name_problem("mlp") is None and model_name_problem("a" * 255) is None
    assert "NUL" in model_name_problem("a\0b")
    assert "longer than a file name" in model_name_problem("a" * 256)
    assert "longer than a file name" in model_name_problem("é" * 128)  # bytes, not characters
    assert model_name_problem("../x") and model_name_problem("") and model_name_problem(["mlp"])
    assert dtype_problem("float32") is None
    assert "not supported" in dtype_problem(["float32"]) and "not supported" in dtype_problem({"a": 1})


def stage(model, dtype="float32"):
    arr = np.zeros(4, np.float32)
    buf = memoryview(arr).cast("B")
    return {"cmd": "stage", "model": model, "version": 1, "token": "t" * 8, "digest": "d",
            "pieces": [["a", "a", dtype, [4], 0, 4, hashlib.sha256(buf).hexdigest()]]}, [buf]


@pytest.mark.parametrize("model,dtype,why", [
    ("a\0b", "float32", "NUL"),
    ("m" * 300, "float32", "longer than a file name"),
    ("mlp", ["float32"], "not supported"),
    ("mlp", {"float32": 1}, "not supported"),
])
def test_the_shard_answers_bad_request_for_what_it_cannot_hold(cluster, model, dtype, why):
    """Regression: these were INTERNAL (an OSError making the directory, an unhashable dtype)."""
    eps = cluster.start_shards(1)
    with ParamClient(eps, timeout=5) as pc:
        header, frames = stage(model, dtype)
        reply = pc.rpc.call({"ps0": (header, frames)}, raise_on_error=False)["ps0"][0]
        assert reply["error"]["code"] == "BAD_REQUEST" and why in reply["error"]["message"], reply
        fetch = pc.rpc.call({"ps0": ({"cmd": "fetch", "model": model, "version": 1}, [])},
                            raise_on_error=False)["ps0"][0]
        assert fetch["error"]["code"] in ("BAD_REQUEST", "UNKNOWN_VERSION"), fetch
        bad_replace = {**header, "model": "mlp", "base": 1, "replace": {"a": [dtype, [4]]}}
        reply = pc.rpc.call({"ps0": (bad_replace, frames)}, raise_on_error=False)["ps0"][0]
        assert reply["error"]["code"] in ("BAD_REQUEST", "UNKNOWN_VERSION"), reply
        assert pc.hello()["ps0"]["ok"]  # and it keeps serving
        if model != "mlp":
            with pytest.raises(PublishError, match=why):  # the publisher checks the same before sending
                pc.publish(model, {"a": np.zeros(4, np.float32)})


def test_follower_reports_are_checked_and_bounded():
    name, models = parse_report({"name": "w0", "models": {"mlp": {"version": 1, "loaded": [1], "refused": [2]}}})
    assert name == "w0" and models == {"mlp": {"version": 1, "loaded": [1], "refused": [2]}}
    for bad in ([], {"name": "", "models": {}}, {"name": "w", "models": {"a\0": {}}},
                {"name": "w", "models": {"m": {"loaded": list(range(99))}}},
                {"name": "w", "models": {"m": {"version": "1"}}}):
        with pytest.raises(ProtocolError):
            parse_report(bad)
    books = Followers(ttl_s=10, limit=2)
    for i, t in enumerate((0.0, 1.0, 2.0)):
        books.note(f"w{i}", {}, t)
    assert sorted(books.snapshot(3.0)) == ["w1", "w2"]  # bounded: the least recently heard went
    assert sorted(books.snapshot(11.5)) == ["w2"]  # and those not heard within the TTL


def test_the_publisher_says_what_a_revert_left_current_and_reads_verdicts():
    from ringserve.client.params import _after_revert, _verdict

    assert _after_revert({"a": 1, "b": 1}, {"a": 1, "b": 1}) == "the previous version v1 stays current"
    assert _after_revert({"a": None}, {"a": None}) == "no version is current, as before"
    lost = _after_revert({"a": None, "b": 1}, {"a": 1, "b": 1})
    assert "a: none" in lost and "lost" in lost and "stays current" not in lost
    assert _verdict({"version": 1, "loaded": [1, 4], "refused": []}, 4) == "loaded"
    assert _verdict({"version": 1, "loaded": [1], "refused": [4]}, 4) == "refused"
    assert _verdict({"version": 1, "loaded": [1], "refused": []}, 4) == "waiting"


def test_a_shard_files_good_follower_reports_and_drops_bad_ones(cluster):
    eps = cluster.start_shards(1)
    with ParamClient(eps, timeout=5) as pc:
        for junk in ({"name": "w", "models": {"a/b": {}}}, "w0", {"name": "x" * 500, "models": {}}):
            reply = pc.rpc.call_all({"cmd": "hello", "follower": junk})["ps0"][0]
            assert reply["ok"] and reply["followers"] == {}, reply  # the snapshot is answered all the same
        good = {"name": "w7", "models": {"mlp": {"version": 2, "loaded": [2], "refused": [3]}}}
        followers = pc.rpc.call_all({"cmd": "hello", "follower": good})["ps0"][0]["followers"]
        assert followers["w7"]["models"] == good["models"] and followers["w7"]["age_s"] < 15
    assert "follower_report_refused" in cluster.shards["ps0"].log_path.read_text()
