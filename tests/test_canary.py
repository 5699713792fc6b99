"""Traffic splits between versions through a real master and workers: canary, sticky A/B, shadow,
promote, validation, and routes that survive a master restart."""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch
import pytest
from safetensors.torch import save_file

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.launch.procs import wait_for_workers, wait_until
from ringserve.worker import demo
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.timeout(150)


def two_versions(cluster, tmp_path):
    """Worker w0 serves mlp as v3, w1 as v4 (weights from files, labelled with version=)."""
    cluster.start_master("--state-dir", str(tmp_path / "state"), "--metrics-port", "0")
    started = []
    for k, (seed, version) in enumerate(((3, 3), (4, 4))):  # both start at once (Cluster.start_workers' flags)
        path = tmp_path / f"mlp-v{version}.safetensors"
        save_file({k: v.contiguous() for k, v in demo.mlp(seed=seed).state_dict().items()}, str(path))
        started.append(cluster._start("ringserve.launch.worker", [
            "--master", cluster.master.info["backend"], "--name", f"w{k}", "--threads", "1", "--heartbeat-interval",
            "0.2", "--model", f"mlp=ringserve.worker.demo:mlp,weights={path},version={version}",
            "--max-batch-size", "16", "--max-queue-delay-us", "2000"], f"w{k}", wait_ready=False))
    for p in started:
        p.wait_ready(90)
    cluster.workers += started
    wait_for_workers(cluster.admin, 2, timeout=60)
    return AdminClient(cluster.admin)


def versions_of(client, n, tags_of=lambda i: None, **kw):
    x = np.ones((1, 256), np.float32)
    seen = []
    for start in range(0, n, 200):  # bounded: 200 in flight at a time
        futs = [(i, client.infer_async("mlp", {"x": x}, tags=tags_of(i), **kw)) for i in range(start, min(n, start + 200))]
        seen += [(i, f.result(timeout=30).version) for i, f in futs]
    return seen


def test_canary_split_sticky_keys_shadow_and_promote(cluster, tmp_path):
    admin = two_versions(cluster, tmp_path)
    assert admin.route("mlp", split="3=90,4=10")["ok"]
    with Client(cluster.frontend, timeout=30) as c:
        seen = Counter(v for _, v in versions_of(c, 2000))
        assert abs(seen[3] / 20 - 90) <= 3 and abs(seen[4] / 20 - 10) <= 3, seen

        assert admin.route("mlp", split="3=50,4=50", sticky_key="user")["ok"]
        by_user = defaultdict(set)
        for i, v in versions_of(c, 600, tags_of=lambda i: {"user": f"u{i % 60}"}):
            by_user[f"u{i % 60}"].add(v)
        assert all(len(vs) == 1 for vs in by_user.values()) and {v for vs in by_user.values() for v in vs} == {3, 4}

        assert admin.route("mlp", promote=3)["ok"]
        assert {v for _, v in versions_of(c, 50)} == {3}
        assert {v for _, v in versions_of(c, 20, version=4)} == {4}  # a pinned version still wins

        assert admin.route("mlp", split="3=100", shadow=4)["ok"]
        assert {v for _, v in versions_of(c, 100)} == {3}  # shadow answers never reach the client
        st = admin.status()
        assert st["routes"]["mlp"]["shadow"] == 4 and st["models"]["mlp"]["ok"] == 2000 + 600 + 50 + 20 + 100
        shadows = scrape(cluster.master.info["metrics"])
        assert wait_until(lambda: value(scrape(cluster.master.info["metrics"]), "ringserve_shadow_requests_total",
                                        version="4", outcome="ok") == 100, 10), shadows.get("ringserve_shadow_requests_total")
        assert admin.route("mlp", clear=True)["ok"] and admin.status()["routes"] == {}


def test_bad_routes_are_refused_and_change_nothing(cluster, tmp_path):
    admin = two_versions(cluster, tmp_path)
    assert admin.route("mlp", split="3=90,4=10")["ok"]
    for kw in ({"split": "3=90,9=10"}, {"split": "3=90,4=20"}, {"split": "garbage"}, {"promote": 7},
               {"split": "3=100", "shadow": 8}):
        reply = admin.route("mlp", **kw)
        assert not reply["ok"] and reply["error"]["code"] == "BAD_REQUEST", (kw, reply)
    assert admin.status()["routes"]["mlp"]["split"] == [[3, 90], [4, 10]]
    assert not admin.route("other", clear=True)["ok"]


def test_routes_survive_a_master_restart(cluster, tmp_path):
    admin = two_versions(cluster, tmp_path)
    assert admin.route("mlp", split="3=80,4=20", sticky_key="user")["ok"]
    again = cluster._start("ringserve.launch.master", ["--frontend", "tcp://127.0.0.1:*", "--backend",
                                                       "tcp://127.0.0.1:*", "--admin", "tcp://127.0.0.1:*",
                                                       "--state-dir", str(tmp_path / "state")], "master2")
    route = AdminClient(again.info["admin"]).status()["routes"]["mlp"]
    assert route["split"] == [[3, 80], [4, 20]] and route["sticky_key"] == "user"


def test_one_worker_keeps_two_versions_from_the_shards_for_a_canary(cluster):
    """Canary flow: pin all traffic to v1, publish v2, split 1=80,2=20 on workers holding both."""
    from ringserve.client.params import ParamClient
    from ringserve.launch.procs import wait_for_workers

    eps = cluster.start_shards(2)
    cluster.start_master()
    states = {v: {k: t.clone() for k, t in demo.mlp(seed=v).state_dict().items()} for v in (1, 2)}
    x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    with ParamClient(eps) as pc:
        assert pc.publish("mlp", states[1]) == 1
        cluster.start_workers(1, "--paramservers", ",".join(f"{n}={e}" for n, e in eps.items()),
                              "--keep-versions", "2", wait=False)
        wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
        admin = AdminClient(cluster.admin)
        assert admin.route("mlp", split="1=100")["ok"]
        assert pc.publish("mlp", states[2]) == 2
    wait_until(lambda: admin.status()["workers"][0]["models"]["mlp"].get("versions") == [1, 2], 30)
    assert admin.route("mlp", split="1=80,2=20")["ok"]
    with Client(cluster.frontend, timeout=30) as c:
        replies = [f.result(timeout=30) for f in [c.infer_async("mlp", {"x": x}) for _ in range(400)]]
    seen = Counter(r.version for r in replies)
    assert seen[1] + seen[2] == 400 and 50 <= seen[2] <= 110, seen
    for v in (1, 2):  # each answer comes from its own version's weights
        with torch.inference_mode():
            want = demo.mlp(seed=v).eval()(torch.from_numpy(x))["logits"].numpy()
        got = next(r for r in replies if r.version == v).outputs["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
