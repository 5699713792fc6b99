"""Issue 19: no single master. Two active masters on real processes; every worker registers with
both, clients spread over them. Kill (SIGKILL) or hang (SIGSTOP) the master a client is on under
closed-loop load: every request gets exactly one answer, nothing is restarted by anyone; a route
set on one master is in force on the other; a master that comes back rejoins without a gap."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.launch.procs import RoleProcess, free_tcp_ports, wait_for_workers, wait_until

pytestmark = pytest.mark.timeout(180)


class Pair:
    """Two masters that are each other's peers, and workers registered with both."""

    def __init__(self, tmp):
        self.tmp, self.procs, self.masters = tmp, [], []
        ports = free_tcp_ports(6)
        self.eps = [{k: f"tcp://127.0.0.1:{ports[3 * i + j]}" for j, k in enumerate(("frontend", "backend", "admin"))}
                    for i in range(2)]

    def start_master(self, i: int) -> RoleProcess:
        ep, peer = self.eps[i], self.eps[1 - i]
        p = RoleProcess("ringserve.launch.master", ["--frontend", ep["frontend"], "--backend", ep["backend"],
                                                    "--admin", ep["admin"], "--peers", peer["admin"],
                                                    "--heartbeat-interval", "0.2"],
                        self.tmp / f"master{i}-{len(self.procs)}.log", wait_ready=False)
        self.procs.append(p)
        p.wait_ready(60)
        if len(self.masters) <= i:
            self.masters.append(p)
        else:
            self.masters[i] = p
        return p

    def start_workers(self, n: int) -> None:
        backends = ",".join(e["backend"] for e in self.eps)
        ws = [RoleProcess("ringserve.launch.worker", ["--master", backends, "--name", f"w{k}", "--threads", "1",
                                                      "--heartbeat-interval", "0.2",
                                                      "--model", "echo=ringserve.worker.demo:slow,arg.delay=0.002"],
                          self.tmp / f"w{k}.log", wait_ready=False) for k in range(n)]
        self.procs += ws
        for w in ws:
            w.wait_ready(90)
        for e in self.eps:
            wait_for_workers(e["admin"], n, timeout=60)

    @property
    def frontends(self) -> list[str]:
        return [e["frontend"] for e in self.eps]

    def stop(self) -> None:
        from helpers import stop_together

        stop_together(self.procs)  # SIGCONT (a hung master) and SIGTERM to all, then each waited for


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    try:
        p.start_master(0)
        p.start_master(1)
        yield p
    finally:
        p.stop()


def closed_loop(client: Client, stop: threading.Event, in_flight: int = 8) -> dict:
    """Keep `in_flight` requests going until `stop`; every answer checked against its own input."""
    answered, errors, times = 0, [], []
    n = 0
    futs = {}

    def submit():
        nonlocal n
        x = np.full((1, 4), float(n), np.float32)
        futs[client.infer_async("echo", {"x": x}, timeout=20)] = n
        n += 1

    for _ in range(in_flight):
        submit()
    while futs:
        done = next(iter(futs))
        i = futs.pop(done)
        try:
            reply = done.result(timeout=30)
            assert reply.outputs["y"][0, 0] == float(i)
            answered += 1
            times.append(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
            errors.append(f"{type(exc).__name__}: {exc}")
        if not stop.is_set():
            submit()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"sent": n, "answered": answered, "errors": errors, "max_gap_s": max(gaps, default=0.0)}


def run_with_fault(pair: Pair, fault) -> tuple[dict, Client]:
    with Client(pair.frontends, timeout=20) as c:
        stop = threading.Event()
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(closed_loop(c, stop)), daemon=True)
        t.start()
        time.sleep(1.0)
        serving = pair.frontends.index(c.master)
        fault(pair.masters[serving])
        time.sleep(2.5)
        stop.set()
        t.join(60)
        out["failovers"] = c.stats.failovers
        out["duplicates_dropped"] = c.stats.duplicates_dropped
        out["serving"] = serving
        out["now_on"] = pair.frontends.index(c.master)
        return out, c


def test_sigkill_of_the_serving_master_loses_nothing(pair):
    pair.start_workers(2)
    res, _ = run_with_fault(pair, lambda m: os.kill(m.pid, signal.SIGKILL))
    assert res["errors"] == [] and res["answered"] == res["sent"], res
    assert res["failovers"] >= 1 and res["now_on"] != res["serving"], res
    other = pair.eps[1 - res["serving"]]["admin"]
    books = AdminClient(other).status()["books"]
    assert books["ok"] and books["leaked"] == 0, books


def test_sigstop_of_the_serving_master_loses_nothing_and_it_rejoins(pair):
    pair.start_workers(2)
    stopped = []

    def hang(m):
        os.kill(m.pid, signal.SIGSTOP)
        stopped.append(m)

    res, _ = run_with_fault(pair, hang)
    assert res["errors"] == [] and res["answered"] == res["sent"], res
    assert res["failovers"] >= 1, res
    os.kill(stopped[0].pid, signal.SIGCONT)  # failback: it comes back as one more active master
    back = pair.eps[res["serving"]]["admin"]
    wait_for_workers(back, 2, timeout=30)
    with Client(pair.eps[res["serving"]]["frontend"], timeout=20) as c:
        assert c.infer("echo", {"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 4)


def test_a_route_set_on_one_master_is_in_force_on_the_other(pair):
    pair.start_workers(1)
    a, b = (AdminClient(e["admin"]) for e in pair.eps)
    assert a.route("echo", split="0=100", sticky_key="user")["ok"]
    wait_until(lambda: "echo" in b.status()["routes"], 5, 0.05, "the route on the peer")
    assert b.status()["routes"]["echo"]["sticky_key"] == "user"
    assert b.route("echo", clear=True)["ok"]  # a later change on the other wins on both
    wait_until(lambda: "echo" not in a.status()["routes"], 5, 0.05, "the clear on the first")
    peers = a.status()["master"]["peers"]
    assert peers[0]["state"] == "up" and peers[0]["workers"] == 1


def test_a_master_that_comes_back_catches_up_on_routes(pair, tmp_path):
    pair.start_workers(1)
    os.kill(pair.masters[1].pid, signal.SIGKILL)
    pair.masters[1].proc.wait(10)
    a = AdminClient(pair.eps[0]["admin"])
    assert a.route("echo", split="0=100")["ok"]  # set while the peer is down
    pair.start_master(1)
    b = AdminClient(pair.eps[1]["admin"])
    wait_until(lambda: "echo" in b.status()["routes"], 10, 0.05, "the restarted master to adopt the route")
    wait_for_workers(pair.eps[1]["admin"], 1, timeout=30)  # and the worker registered with it again


def test_admin_commands_take_every_master(pair):
    import json
    import subprocess
    import sys

    pair.start_workers(1)
    both = ",".join(e["admin"] for e in pair.eps)
    run = lambda *a: subprocess.run([sys.executable, "-m", "ringserve.launch.admin", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    out = run("status", "--master", both, "--json")
    assert out.returncode == 0, out.stderr
    views = json.loads(out.stdout)["masters"]
    assert set(views) == set(both.split(",")) and all(len(v["workers"]) == 1 for v in views.values())
    text = run("status", "--master", both).stdout
    assert text.count("== master") == 2 and "role=active peers" in text
    assert run("route", "--master", both, "--model", "echo", "--split", "0=100").returncode == 0
    wait_until(lambda: all("echo" in AdminClient(e["admin"]).status()["routes"] for e in pair.eps), 5, 0.05)
    drained = run("drain", "w0", "--master", both)  # one DRAIN is enough: the worker leaves every master
    assert drained.returncode == 0 and ["w0"] in [r.get("draining") for r in json.loads(drained.stdout).values()]
    wait_until(lambda: all(not AdminClient(e["admin"]).status()["workers"] for e in pair.eps), 10, 0.05)


def test_ringserve_local_runs_two_masters():
    from helpers import run_local

    rc, out, err = run_local("--masters", "2", "--requests", "2", "--workers", "1", "--shards", "1")
    assert rc == 0, err[-2000:]
    assert out.count("== master") == 2 and "role=active peers" in out and "max |ringserve - in-process|" in out


def test_the_gateway_serves_through_either_master(pair):
    """The gateway takes every master too: kill the one its requests go to, HTTP keeps answering."""
    import json
    import urllib.request

    pair.start_workers(1)
    gw = RoleProcess("ringserve.launch.gateway", ["--master", ",".join(pair.frontends),
                                                  "--admin", ",".join(e["admin"] for e in pair.eps),
                                                  "--listen", "127.0.0.1:0"], pair.tmp / "gateway.log")
    pair.procs.append(gw)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()

    def infer() -> list:
        req = urllib.request.Request(f"{gw.info['url']}/v2/models/echo/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=20) as r:
            return json.loads(r.read())["outputs"][0]["data"]

    assert wait_until(lambda: _ok(infer), 20, 0.2, "the gateway to serve")
    for m in pair.masters:  # whichever it is on, one of them dies: it moves to the other
        if m.alive():
            os.kill(m.pid, signal.SIGKILL)
            break
    assert [infer() for _ in range(5)][-1] == [1, 2, 3, 4]


def _ok(fn) -> bool:
    try:
        fn()
        return True
    except OSError:
        return False
