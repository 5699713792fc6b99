"""Replicated parameter-server shards (issue 20) on real processes: R = 2 of 3 shards, one killed
before a publish, during a publish, during a fetch, replaced empty; placement, quorum, repair,
rollback, mismatch."""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time

import zmq

import numpy as np
import pytest
from structlog.testing import capture_logs

from ringserve.client import Client
from ringserve.client.params import ParamClient, PublishError, RingMismatch
from ringserve.launch.procs import free_tcp_ports, wait_for_workers, wait_until
from ringserve.protocol.placement import fingerprint, moved_keys, owners, place, plan
from ringserve.protocol.shardrpc import ShardRPC
from ringserve.worker.sync import fetch_into, plan_version
from helpers import expected, mlp_state, shard_list

pytestmark = pytest.mark.timeout(180)

SMALL_CHUNK = 16 * 1024  # the demo MLP in many pieces, spread over every shard


def start_ring(cluster, count=3, extra=()):
    """`count` shards on fixed free ports, each told the whole list (so they check and repair)."""
    ports = free_tcp_ports(count)
    eps = {f"ps{i}": f"tcp://127.0.0.1:{p}" for i, p in enumerate(ports)}
    cluster.start_shards(count, endpoints={n: {"endpoint": e} for n, e in eps.items()},
                         extra=("--shards", shard_list(eps), "--repair-interval", "0.3", *extra))
    return eps


def restart(cluster, eps, name, label, wipe=False, extra=()):
    if wipe:
        shutil.rmtree(cluster.tmp / name)
    return cluster._start("ringserve.launch.ps", ["--name", name, "--data-dir", str(cluster.tmp / name),
                                                  "--bind", eps[name], "--announce-interval", "0.2",
                                                  "--shards", shard_list(eps), "--repair-interval", "0.3", *extra],
                          label)


def kill(cluster, name, sig=signal.SIGKILL):
    cluster.shards[name].signal(sig)
    if sig == signal.SIGKILL:
        cluster.shards[name].wait(5)


def manifests_on_disk(cluster, name, model="mlp"):
    out = {}
    for mf in sorted((cluster.tmp / name / model).glob("v*.manifest.json")):
        m = json.loads(mf.read_text())
        out[m["version"]] = (m["digest"], sorted(map(json.dumps, m["pieces"])))
    return out


def test_owners_are_r_distinct_shards_and_a_fourth_moves_about_r_over_n():
    keys = [f"layer{i}.weight#{k}" for i in range(300) for k in range(5)]
    for k in keys[:100]:
        o = owners(k, ["c", "a", "b"], 2)
        assert len(o) == len(set(o)) == 2 and o[0] == owners(k, "abc", 1)[0]
    moved = moved_keys(keys, "abc", "abcd", 2)
    assert 0 < len(moved) / len(keys) <= 1.5 * 2 / 4, len(moved) / len(keys)
    assert all("d" in new for _, new in moved.values())  # only what the new shard takes moves
    assert fingerprint("abc", 2) == fingerprint(["c", "b", "a"], 2) != fingerprint("abc", 1)
    pieces = plan({"emb": ("float32", (4096, 64), 4)}, chunk_bytes=SMALL_CHUNK)
    placed = place(pieces, "abc", 2)
    assert sum(map(len, placed.values())) == 2 * len(pieces)
    with pytest.raises(ValueError, match="more than the 3"):
        ParamClient({n: "tcp://127.0.0.1:1" for n in "abc"}, replicas=4)
    with pytest.raises(ValueError, match="write-quorum"):
        ParamClient({n: "tcp://127.0.0.1:1" for n in "abc"}, replicas=2, write_quorum=3)


def test_a_worker_with_another_replica_count_never_uses_the_shards(cluster):
    eps = start_ring(cluster)
    cluster.start_master()
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        pc.publish("mlp", mlp_state(1))
    (w,) = cluster.start_workers(1, "--paramservers", shard_list(eps), "--replicas", "1", wait=False)
    wait_until(lambda: "shard_ring_mismatch" in w.log_path.read_text(), 30, 0.2, "the mismatch logged")
    assert "--replicas 2, this role with 1" in w.log_path.read_text()


def test_shard_killed_before_publish_quorum_report_new_worker_and_repair(cluster):
    eps = start_ring(cluster)
    cluster.start_master()
    v1, v2, v3 = mlp_state(1), mlp_state(2), mlp_state(3)
    x = np.random.default_rng(0).standard_normal((4, 256), dtype=np.float32)
    with pytest.raises(RingMismatch, match="--replicas"):
        with ParamClient(eps, replicas=1, chunk_bytes=SMALL_CHUNK) as pc:
            pc.publish("mlp", v1)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        assert pc.publish("mlp", v1) == 1 and pc.last_report["missed"] == []
        cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False)
        wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
        kill(cluster, "ps1")
        with pytest.raises(PublishError, match="write quorum"):  # W = R = 2: refused, v1 intact
            pc.publish("mlp", v2)
        assert {n: s["current"] for n, s in pc.versions("mlp").items() if n != "ps1"} == {"ps0": 1, "ps2": 1}
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0, write_quorum=1) as pc:
        assert pc.publish("mlp", v2) == 2
        assert pc.last_report["missed"] == ["ps1"] and pc.last_report["under_replicated_pieces"] > 0
        wait_for_workers(cluster.admin, 1, 60, model="mlp", version=2)
        cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False)  # a new worker starts and serves
        wait_for_workers(cluster.admin, 2, 60, model="mlp", version=2)
        with Client(cluster.frontend, timeout=20) as c:
            for _ in range(8):  # both workers, bit-exact v2
                r = c.infer_async("mlp", {"x": x}).result()
                assert r.version == 2
                np.testing.assert_array_equal(r.outputs["logits"], expected(v2, x))
        with pytest.raises(PublishError, match="fewer than 2 owners"):
            with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as strict:
                strict.rollback("mlp", 1)  # some v1 pieces are only on one live owner now
        pc.rollback("mlp", 1)  # W = 1: allowed, ps1 reported missed
        assert pc.last_report["missed"] == ["ps1"]
        wait_for_workers(cluster.admin, 2, 60, model="mlp", version=1)
        restart(cluster, eps, "ps1", "ps1-back")  # it missed v2 and the rollback: repair catches it up
        wait_until(lambda: pc.versions("mlp")["ps1"] == {"versions": [1, 2], "current": 1}, 30, 0.2,
                   "ps1 repaired (v2) and on the rolled-back current (v1)")
        others = {i for n in ("ps0", "ps2") for i in manifests_on_disk(cluster, n)[2][1]}
        owned = sorted(i for i in others if "ps1" in owners(json.loads(i)[0], eps, 2))
        assert manifests_on_disk(cluster, "ps1")[2][1] == owned  # exactly its share of v2, from the other owners
        with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as strict:  # every owner again: W = 2 works
            assert strict.publish("mlp", v3) == 3 and strict.last_report["missed"] == []
        wait_for_workers(cluster.admin, 2, 60, model="mlp", version=3)
        hello = pc.hello()["ps1"]
        assert hello["replicas"] == 2 and hello["repair"]["repaired_versions"] >= 1


def test_replaced_empty_shard_is_repaired_with_equal_manifests(cluster):
    eps = start_ring(cluster)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        pc.publish("mlp", mlp_state(1))
        pc.publish("mlp", {k: v for k, v in mlp_state(2).items() if k.endswith("bias")}, base=1)
        before = manifests_on_disk(cluster, "ps2")
        assert set(before) == {1, 2}
        kill(cluster, "ps2")
        restart(cluster, eps, "ps2", "ps2-empty", wipe=True)  # a replaced disk: same name, nothing on it
        wait_until(lambda: pc.versions("mlp")["ps2"] == {"versions": [1, 2], "current": 2}, 30, 0.2,
                   "the empty shard repaired")
        assert manifests_on_disk(cluster, "ps2") == before
        hello = pc.hello()["ps2"]
        wait_until(lambda: pc.hello()["ps2"]["repair"]["under_replicated_versions"] == 0, 10, 0.2, "nothing left")
        assert hello["repair"]["repaired_pieces"] > 0


@contextlib.contextmanager
def planned_fetch(cluster, seed: int):
    """A 3-shard ring holding mlp v1 (published with `seed`) and a worker's plan to fetch it, as
    the worker makes it from the manifests: yields (endpoints, state, rpc, new, need)."""
    eps = start_ring(cluster)
    state = mlp_state(seed)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        pc.publish("mlp", state)
    ctx = zmq.Context()
    rpc = ShardRPC(ctx, eps, timeout=5.0)
    try:
        replies = rpc.call_all({"cmd": "fetch", "model": "mlp", "version": 1, "manifest_only": True})
        new, need = plan_version({n: h["manifest"] for n, (h, _) in replies.items()}, None)
        yield eps, state, rpc, new, need
    finally:
        rpc.close()
        ctx.destroy(linger=0)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP])
def test_fetch_moves_to_another_owner_when_a_shard_dies_mid_fetch(cluster, sig):
    with planned_fetch(cluster, seed=5) as (eps, state, rpc, new, need):
        assert len(need) == 3 and all(len(new.sources[k]) == 2 for k in new.sources)
        kill(cluster, "ps1", sig)  # it owes pieces now: they come from the other owners
        try:
            got = fetch_into(rpc, "mlp", 1, need, new, timeout=20.0, window=1, batch_bytes=SMALL_CHUNK,
                             sources=new.sources, failover_s=1.0)
        finally:
            if sig == signal.SIGSTOP:
                cluster.shards["ps1"].signal(signal.SIGCONT)
        assert got > 0
        for name, t in new.tensors().items():  # bit-exact
            np.testing.assert_array_equal(t.numpy(), state[name].numpy())


def test_adding_a_fourth_shard_moves_only_the_pieces_whose_owners_change(cluster):
    import subprocess
    import sys

    eps = start_ring(cluster)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        pc.publish("mlp", mlp_state(1))
    before = {n: manifests_on_disk(cluster, n)[1][1] for n in eps}
    four = {**eps, "ps3": f"tcp://127.0.0.1:{free_tcp_ports(1)[0]}"}
    # a shard drops what it no longer owns in repair's full check (every 30 s by default): every 1 s here
    full_check = ("--full-check-interval", "1.0")
    cluster._start("ringserve.launch.ps", ["--name", "ps3", "--data-dir", str(cluster.tmp / "ps3"), "--bind",
                                          four["ps3"], "--shards", shard_list(four), "--repair-interval", "0.3",
                                          *full_check], "ps3")
    for n in eps:  # one at a time: with R = 2 every piece stays on a live owner
        kill(cluster, n, signal.SIGTERM)
        cluster.shards[n].wait(10)
        cluster.shards[n] = restart(cluster, four, n, f"{n}-four", extra=full_check)
    out = subprocess.run([sys.executable, "-m", "ringserve.launch.publish", "--shards", shard_list(four),
                          "--model", "mlp", "--rebalance-from", shard_list(eps), "--wait-s", "60"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["done"] and report["under_quorum"] == 0
    assert 0 < report["pieces_moved_fraction"] <= 1.5 * 2 / 4
    after = {n: manifests_on_disk(cluster, n)[1][1] for n in four}
    copied = sum(len(set(after[n]) - set(before.get(n, []))) for n in four)
    assert copied == report["pieces_moved"]  # only the pieces whose owners changed were copied
    with ParamClient(four, chunk_bytes=SMALL_CHUNK, timeout=3.0) as pc:
        assert pc.publish("mlp", mlp_state(2)) == 2 and pc.last_report["missed"] == []


def test_delta_sync_with_a_stopped_shard_loses_no_request(cluster):
    eps = start_ring(cluster)
    cluster.start_master()
    v1 = mlp_state(1)
    v2 = {**v1, **{k: v for k, v in mlp_state(2).items() if k.endswith("weight")}}
    x = np.random.default_rng(1).standard_normal((2, 256), dtype=np.float32)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0, write_quorum=1) as pc:
        pc.publish("mlp", v1)
        cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False)
        wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
        with Client(cluster.frontend, timeout=20) as c:
            kill(cluster, "ps2", signal.SIGSTOP)  # frozen: no answer, no close
            try:
                pc.publish("mlp", {k: v for k, v in v2.items() if k.endswith("weight")}, base=1)
                assert pc.last_report["missed"] == ["ps2"]
                seen, failures = set(), 0
                for _ in range(1500):  # requests all along the delta sync (30 s at most): every one answered
                    time.sleep(0.02)
                    try:
                        r = c.infer_async("mlp", {"x": x}).result()
                    except Exception:  # noqa: BLE001 - counted: must stay 0
                        failures += 1
                        continue
                    np.testing.assert_array_equal(r.outputs["logits"], expected({1: v1, 2: v2}[r.version], x))
                    seen.add(r.version)
                    if r.version == 2:
                        break
                assert failures == 0 and 2 in seen
            finally:
                cluster.shards["ps2"].signal(signal.SIGCONT)
        wait_until(lambda: pc.versions("mlp")["ps2"] == {"versions": [1, 2], "current": 2}, 30, 0.2,
                   "ps2 repaired after SIGCONT")


@pytest.mark.parametrize("moment,victim,quorum", [("stage", "ps1", 2), ("stage", "ps1", 1),
                                                  ("commit", "ps0", 2), ("commit", "ps2", 1)])
def test_shard_killed_during_a_publish_commits_on_w_owners_or_changes_nothing(cluster, moment, victim, quorum):
    """SIGKILL of a shard while its stage travels, or just before the commits go out (ps0 is the
    arbiter): the publish either commits with every piece on >= W owners, or fails with v1 current
    everywhere and v2 nowhere; a worker serving all along answers each request from one whole
    version, bit-exact; the killed shard, restarted, agrees with the others."""
    eps = start_ring(cluster)
    cluster.start_master()
    v1, v2 = mlp_state(1), mlp_state(2)
    x = np.random.default_rng(2).standard_normal((2, 256), dtype=np.float32)
    want = {1: expected(v1, x), 2: expected(v2, x)}
    answers, failures, stop = [], [], threading.Event()

    def load():
        with Client(cluster.frontend, timeout=20) as c:
            for _ in range(3000):  # bounded: ~30 s at most
                if stop.is_set():
                    return
                try:
                    r = c.infer_async("mlp", {"x": x}).result()
                    answers.append((r.version, r.outputs["logits"]))
                except Exception as exc:  # noqa: BLE001 - counted: must stay empty
                    failures.append(exc)
                time.sleep(0.01)

    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0, write_quorum=quorum) as pc:
        pc.publish("mlp", v1)
        cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False)
        wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
        loader = threading.Thread(target=load)
        loader.start()
        killed = []

        def kill_once(*_):
            if not killed:
                killed.append(victim)
                kill(cluster, victim)

        real_call = pc.rpc.call

        def call(requests, *args, **kw):  # only times the kill: every call is the real one
            if moment == "commit" and any(h.get("cmd") == "commit" for h, _ in requests.values()):
                kill_once()
            return real_call(requests, *args, **kw)

        pc.rpc.call = call
        try:
            try:
                committed = pc.publish("mlp", v2, check_workers=False,
                                       progress=kill_once if moment == "stage" else None) == 2
            except PublishError:
                committed = False
        finally:
            pc.rpc.call = real_call
        assert killed == [victim]
        live = [n for n in eps if n != victim]
        states = pc.versions("mlp")
        if committed:
            held = pc._holders(pc.manifests("mlp", 2))
            pieces = plan({k: (str(v.numpy().dtype), tuple(v.shape), v.numpy().itemsize) for k, v in v2.items()},
                          SMALL_CHUNK)
            assert sorted(held) == sorted(p.key for p in pieces)  # every piece, on >= W live owners
            assert min(held.values()) >= quorum
            assert all(states[n]["current"] == 2 for n in live)
            wait_for_workers(cluster.admin, 1, 60, model="mlp", version=2)
        else:
            assert quorum == 2  # with W = 1 two live owners of every piece are enough
            assert all(states[n]["current"] == 1 and 2 not in states[n]["versions"] for n in live)
            time.sleep(1.0)  # the worker keeps serving v1 meanwhile (checked below)
        stop.set()
        loader.join(timeout=60)
        restart(cluster, eps, victim, f"{victim}-back")
        wait_until(lambda: pc.versions("mlp")[victim] == {"versions": [1, 2] if committed else [1],
                                                          "current": 2 if committed else 1},
                   30, 0.2, f"{victim} back and agreeing with the others")
    assert not failures and answers
    for version, logits in answers:  # one whole version per answer, never a blend
        assert version in ((1, 2) if committed else (1,))
        np.testing.assert_array_equal(logits, want[version])


def test_a_stall_of_every_shard_drops_none_of_them_and_the_fetch_completes(cluster):
    """A machine too busy for every shard at once (all SIGSTOPped for 2 s, longer than
    FAILOVER_S) is not a dead shard: no owner is dropped (no failover logged), and the fetch
    completes bit-exact once they run again."""
    with planned_fetch(cluster, seed=6) as (eps, state, rpc, new, need):
        for n in eps:
            kill(cluster, n, signal.SIGSTOP)
        waker = threading.Timer(2.0, lambda: [cluster.shards[n].signal(signal.SIGCONT) for n in eps])
        waker.start()
        try:
            with capture_logs() as logs:
                got = fetch_into(rpc, "mlp", 1, need, new, timeout=20.0, window=1, batch_bytes=SMALL_CHUNK,
                                 sources=new.sources, failover_s=1.0)
        finally:
            waker.join(10)
            for n in eps:
                cluster.shards[n].signal(signal.SIGCONT)
        assert got > 0
        assert [e for e in logs if e.get("event") == "weights_fetch_failover"] == []
        for name, t in new.tensors().items():
            np.testing.assert_array_equal(t.numpy(), state[name].numpy())


def test_with_keys_a_replaced_empty_shard_is_repaired_by_its_peers(cluster, tmp_path):
    """CURVE everywhere: a shard's own key lets it read (hello, fetch) from its peers, so repair
    works with --keys too; the repaired manifests equal the others'."""
    from ringserve.protocol.security import Security, create_identity

    keys = tmp_path / "keys"
    ports = free_tcp_ports(3)
    eps = {f"ps{i}": f"tcp://127.0.0.1:{p}" for i, p in enumerate(ports)}
    for n in eps:
        create_identity(keys, "shard", n)
    create_identity(keys, "publisher", "p1")

    flags = ("--shards", shard_list(eps), "--repair-interval", "0.3", "--keys", str(keys))
    cluster.start_shards(3, endpoints={n: {"endpoint": e} for n, e in eps.items()}, extra=flags)
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK, timeout=3.0, security=Security(str(keys), "publisher", "p1")) as pc:
        pc.publish("mlp", mlp_state(1))
        pc.publish("mlp", mlp_state(2))
        before = manifests_on_disk(cluster, "ps2")
        kill(cluster, "ps2")
        shutil.rmtree(cluster.tmp / "ps2")
        cluster.shards["ps2"] = cluster._start("ringserve.launch.ps", [
            "--name", "ps2", "--data-dir", str(cluster.tmp / "ps2"), "--bind", eps["ps2"], "--announce-interval",
            "0.2", *flags], "ps2-empty")
        wait_until(lambda: pc.versions("mlp")["ps2"] == {"versions": [1, 2], "current": 2}, 30, 0.2,
                   "the empty shard repaired over CURVE")
        assert manifests_on_disk(cluster, "ps2") == before
        assert pc.hello()["ps2"]["repair"]["repaired_pieces"] > 0
