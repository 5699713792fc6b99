"""SIGTERM to each role under load loses nothing (what Kubernetes does on every rollout and scale-down:
deploy/base/probe/drain.sh sends it): a worker drains and leaves; the master stops taking requests
and answers what it holds within --drain-timeout; a shard stops cleanly and starts again on its data."""
from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from ringserve.client import Client, Overloaded
from ringserve.client.admin import AdminClient
from ringserve.client.errors import Timeout
from ringserve.client.params import ParamClient
from ringserve.launch.procs import wait_until
from helpers import expected, mlp_state, shard_list

pytestmark = pytest.mark.timeout(150)


def x_of(i: int) -> dict:
    return {"x": np.full((1, 4), float(i), np.float32)}


def names(admin: str) -> set[str]:
    return {w["name"] for w in AdminClient(admin).status()["workers"]}


def test_sigterm_to_a_worker_under_load_loses_nothing(cluster):
    cluster.start_master()
    cluster.start_workers(2, "--credit", "4", model="echo=ringserve.worker.demo:slow,arg.delay=0.02")
    leaving = cluster.workers[1]
    with Client(cluster.frontend, timeout=60) as c:
        futures = [c.infer_async("echo", x_of(i)) for i in range(400)]
        wait_until(lambda: sum(f.done() for f in futures) >= 50, 30, what="work under way")
        leaving.signal(signal.SIGTERM)
        assert leaving.wait(30) == 0, leaving.tail_log()  # drained and left on its own
        for i, f in enumerate(futures):
            np.testing.assert_array_equal(f.result(timeout=60).outputs["y"], x_of(i)["x"])
        assert c.stats.duplicates_dropped == 0
    assert names(cluster.admin) == {"w0"}
    st = AdminClient(cluster.admin).status()
    assert st["models"]["echo"]["ok"] == 400 and st["models"]["echo"]["errors"] == {}
    cluster.check_books()


def test_sigterm_to_the_master_under_load_answers_everything(cluster):
    """What the master holds is answered within --drain-timeout; what arrives while it stops gets a
    retryable OVERLOADED at once; nothing is left without an answer; it exits 0."""
    master = cluster.start_master("--drain-timeout", "10")
    cluster.start_workers(2, "--credit", "4", model="echo=ringserve.worker.demo:slow,arg.delay=0.05")
    with Client(cluster.frontend, timeout=30) as c:
        held = [c.infer_async("echo", x_of(i)) for i in range(200)]
        wait_until(lambda: sum(f.done() for f in held) >= 20, 30, what="work under way")
        master.signal(signal.SIGTERM)
        wait_until(lambda: AdminClient(cluster.admin).status()["stopping"], 5, 0.01, "the master stopping")
        late = [c.infer_async("echo", x_of(i)) for i in range(20)]
        for i, f in enumerate(held):
            np.testing.assert_array_equal(f.result(timeout=30).outputs["y"], x_of(i)["x"])
        for i, f in enumerate(late):
            try:
                np.testing.assert_array_equal(f.result(timeout=30).outputs["y"], x_of(i)["x"])
            except Overloaded as exc:
                assert exc.retryable and "shutting down" in str(exc)
            except Timeout:
                pytest.fail("a request sent while the master stopped got no answer")
    assert master.wait(15) == 0, master.tail_log()


def test_sigterm_to_a_shard_during_a_sync_then_restart(cluster):
    """A shard stopped while a worker takes weights from it exits at once and cleanly; started again
    on its data dir it has the same committed versions, and the worker ends up serving them."""
    eps = cluster.start_shards(2)
    with ParamClient(eps, timeout=10) as pc:
        pc.publish("mlp", mlp_state(1))
        before = pc.hello()
    cluster.start_master()
    victim = cluster.shards["ps1"]
    w = cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False)[0]
    victim.signal(signal.SIGTERM)  # while the worker starts and syncs
    t0 = time.monotonic()
    assert victim.wait(10) == 0, victim.tail_log()
    assert time.monotonic() - t0 < 10
    cluster._start("ringserve.launch.ps", ["--name", "ps1", "--data-dir", str(cluster.tmp / "ps1"), "--bind", eps["ps1"],
                                          "--pub", victim.info["pub"], "--announce-interval", "0.2"], "ps1-again")
    with ParamClient(eps, timeout=10) as pc:
        after = pc.hello(timeout=10)
    for name in eps:
        assert after[name]["current"] == before[name]["current"] == {"mlp": 1}
        assert not after[name].get("corrupt")
    admin = AdminClient(cluster.admin)
    wait_until(lambda: any(m.get("state") == "ready v1" for wk in admin.status()["workers"]
                           for m in wk["models"].values()), 60, 0.2, "the worker serving v1")
    x = np.random.default_rng(0).standard_normal((2, 256), dtype=np.float32)
    with Client(cluster.frontend, timeout=30) as c:
        np.testing.assert_allclose(c.infer("mlp", {"x": x})["logits"], expected(mlp_state(1), x), rtol=1e-5, atol=1e-5)
    assert w.alive()
