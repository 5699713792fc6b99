"""ringserve across hosts: network namespaces on one bridge (bench/netns.py), docs/deployment.md's
deployment from its TOML files with CURVE keys (bench/multihost.py), load from a client host, faults.

Every scenario sends requests open-loop from the client host and checks each got exactly one
answer, its own (echo of its input; the published mlp's output). The faults: a TCP proxy of our
own on one worker host's path (delay, stall, reset), a worker host unplugged for longer than the
liveness, the client host's link flapping. Needs root (`ip netns`); skips with the reason otherwise.
Every namespace (with its veths and the bridge) and every process goes at the end even when a
test fails: the module's fixture finalizer, and each test's finalizer plugs links back in.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

import pytest

from bench.netns import Lab, probe
from ringserve.launch.procs import wait_until

REASON = probe()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"multi-host tests: {REASON}"),
              pytest.mark.timeout(150)]

if REASON is None:
    from bench.multihost import HB, LIVENESS, PROXIED, WORKERS, Deployment, redispatch_s

RATE = 100.0  # requests per second from the client host


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("multihost"))
    try:
        d.up()
        yield d
    finally:
        d.close()
        assert d.lab.leftovers() == [], "namespaces left behind"


@pytest.fixture
def healthy(dep):
    """Each test starts with every link up, the proxy passing and both workers serving; and it
    leaves them so (links plugged back in even when it fails), with the master's books balanced."""
    dep.wait_serving(WORKERS)
    yield dep
    dep.set_proxy("pass")
    for host in dep.lab.hosts:
        dep.lab.restore(host)
        dep.lab.unshape(host)
    dep.wait_serving(WORKERS, timeout=30)
    books = wait_until(lambda: (lambda b: b if b["pending"] == 0 else None)(dep.status()["books"]), 20, 0.2,
                       "every request answered")
    assert books["ok"] and books["leaked"] == 0 and books["in_flight"] == 0, books


def all_right(report: dict) -> dict:
    s = report["summary"]
    assert (s["lost"], s["errors"], s["wrong"], s["duplicated"]) == (0, 0, 0, 0), (
        s, [r for r in report["records"] if r.get("outcome") != "ok"][:5])
    assert s["ok"] == s["requests"]
    return s


def test_published_weights_are_served_across_hosts(healthy):
    """The publisher on the client host wrote mlp v1 to the shard host; both worker hosts took it
    from there and answer with its outputs (checked against the model built locally)."""
    s = all_right(healthy.drive("mlp", 40, RATE, model="mlp").result())
    assert set(s["by_worker"]) == set(WORKERS), s
    st = healthy.status_cli()  # the operator's ringserve-admin --config ~/ringserve.toml status, over CURVE
    assert st["models"]["mlp"]["state"] == "ready" and st["models"]["mlp"]["versions"] == [1], st["models"]


def test_delay_on_one_worker_path(healthy):
    """50 ms each way on gpu1's path to the master: everything still answered, right, once."""
    healthy.set_proxy("delay 50")
    report = healthy.drive("delay", 200, RATE).result()
    s = all_right(report)
    assert set(s["by_worker"]) == set(WORKERS), s
    slow = [r["done"] - r["sent"] for r in report["records"] if r.get("worker") == PROXIED]
    assert statistics.median(slow) >= 0.1, "the proxy's delay was not on gpu1's path"  # 2 x 50 ms, a lower bound


def test_stall_then_resets_on_one_worker_path(healthy):
    """gpu1's path stalls for longer than the liveness (the master evicts it, its requests go to gpu2),
    then every connection on it is reset for a while; gpu1 comes back and serves."""
    run = healthy.drive("stall", 400, RATE)
    time.sleep(1.0)
    healthy.set_proxy("stall")
    time.sleep(HB * LIVENESS * 3)
    healthy.set_proxy("pass")
    time.sleep(1.0)
    healthy.set_proxy("reset")
    time.sleep(0.5)
    healthy.set_proxy("pass")
    all_right(run.result())
    healthy.wait_serving([PROXIED])
    s = all_right(healthy.drive("after-stall", 60, RATE).result())
    assert PROXIED in s["by_worker"], s


def test_worker_host_cut_off_longer_than_liveness(healthy):
    """gpu2 unplugged mid-load: the master evicts it after liveness x interval and re-dispatches what
    it held, none lost; plugged back in, it registers again and serves."""
    retries_before = healthy.status()["models"]["echo"]["retries"]
    run = healthy.drive("cut", 400, RATE)
    time.sleep(1.0)
    cut_at = time.time()
    healthy.lab.cut("gpu2")
    healthy.wait_gone("gpu2")
    gone_at = time.time()
    time.sleep(max(0.0, cut_at + HB * LIVENESS * 4 - time.time()))
    healthy.lab.restore("gpu2")
    report = run.result()
    all_right(report)
    # what gpu2 held when it was cut off waited for the eviction (at least (liveness - 1) x interval
    # after the cut: its last heartbeat may have come up to one interval before), then went to gpu1
    assert redispatch_s(report["records"], cut_at, gone_at) >= HB * (LIVENESS - 1) * 0.8
    assert healthy.status()["models"]["echo"]["retries"] > retries_before
    healthy.wait_serving(["gpu2"])
    s = all_right(healthy.drive("after-cut", 60, RATE).result())
    assert "gpu2" in s["by_worker"], s


def test_client_host_link_flapping(healthy):
    """The client and the master on different hosts; the client's link goes down and up five times
    during the load: every request still gets exactly one answer."""
    run = healthy.drive("flap", 400, RATE)
    time.sleep(0.5)
    for _ in range(5):
        healthy.lab.cut("client")
        time.sleep(0.4)
        healthy.lab.restore("client")
        time.sleep(0.4)
    all_right(run.result())


def test_weight_sync_over_a_capped_shard_link(healthy):
    """The shard host's link capped at 40 Mbit/s (tc tbf): a new version still reaches both worker
    hosts while they serve load, and they answer with its outputs."""
    healthy.lab.shape("shards", "40mbit")
    run = healthy.drive("during-sync", 300, RATE)
    healthy.publish_mlp(seed=2)  # version 2
    all_right(run.result())
    wait_until(lambda: all(str(w["models"]["mlp"]["state"]) == "ready v2" for w in healthy.status()["workers"]),
               60, 0.3, "both workers serving mlp v2")
    s = all_right(healthy.drive("mlp-v2", 40, RATE, model="mlp", seed=2).result())
    assert set(s["by_worker"]) == set(WORKERS), s


def test_workers_hear_the_shards_announcements(dep):
    """docs/deployment.md binds the shards to 0.0.0.0; workers on other hosts still hear their PUB (a
    worker subscribes where it reached the shard: worker/sync.py reachable_pub). gpu1's link was never
    cut in this module, so any resync on it would mean it hears nothing (gpu2's unplugging made some)."""
    # With the bug it resynced every 2 s for the whole module (about 40 times); a loaded machine can still
    # hold a 0.2 s announcement back for 2 s once or twice, which is not the bug.
    resyncs = (dep.tmp / "gpu1.log").read_text().count("shard_silent_resync")
    assert resyncs <= 4, f"gpu1 hears no announcements ({resyncs} silent-shard resyncs)"


def test_shard_host_cut_off_during_sync():
    pytest.skip("this deployment keeps both shards on one host (docs/deployment.md), so cutting it cuts every "
                "replica; a shard lost in the middle of a worker's sync, with the others serving its pieces, is "
                "tested in tests/test_replication.py (SIGKILL and SIGSTOP of one of 3 shards mid-fetch)")


def test_lab_removes_everything_even_when_the_test_fails(tmp_path):
    """A failure inside a Lab still takes its namespaces, veths, bridge and processes with it."""
    lab = Lab(tmp_path)
    proc = None
    with pytest.raises(RuntimeError, match="boom"):
        with lab:
            lab.add_host("a")
            lab.add_host("b")
            proc = lab.start("a", "bench.tcpproxy", ["--listen", f"{lab.hosts['a'].address}:0", "--target",
                                                     f"{lab.hosts['b'].address}:9", "--mode-file",
                                                     str(tmp_path / "mode")], "proxy")
            host, port = proc.info["endpoint"].removeprefix("tcp://").rsplit(":", 1)
            code = (f"import socket\ntry: socket.create_connection(('{host}', {port}), 2)\n"
                    "except ConnectionResetError: pass  # the proxy accepted, found no target and reset: reached")
            reach = lab.run("b", [sys.executable, "-c", code])
            assert reach.returncode == 0, reach.stderr  # host b reaches host a across the bridge

            raise RuntimeError("boom")
    assert lab.leftovers() == []
    assert proc is not None and not proc.alive()
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert lab.tag not in names
