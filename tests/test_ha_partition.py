"""Issue 19, no split brain: two active masters on hosts of their own (network namespaces, as the
multi-host tests build them), a worker host registered with both, a client host reaching both.
The link between the two masters is cut (a blackhole route each way: every other path stays up)
while clients load both: no request is answered twice or lost, each master keeps within its
share of the worker's credit, a route changed on one side stays there; when the link heals the
pair converges on one route table with no operator. Then the host of the master a client is on
is cut off (its link down) under load: the client moves to the other master, nothing lost."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from bench.netns import Lab, NetnsUnavailable, probe

pytestmark = pytest.mark.timeout(240)

DRIVER = r'''
import json, sys, threading, time
import numpy as np
from ringserve.client import Client
from ringserve.client.admin import AdminClient
args = json.loads(sys.argv[1])

def load(frontend, n, out, announce=False):
    """n requests, 8 in flight (closed loop), each checked against its own input."""
    answered, errors = 0, []
    with Client(frontend, timeout=20) as c:
        out["first_master"] = c.master
        if announce:  # the test cuts the host of the master this client is on
            print(json.dumps({"on": c.master}), flush=True)
        i, futs = 0, {}
        while futs or i < n:
            while i < n and len(futs) < 8:
                futs[c.infer_async("echo", {"x": np.full((1, 4), float(i), np.float32)})] = i
                i += 1
                time.sleep(0.005)  # spread over a few seconds, so a fault lands in the middle
            f = next(iter(futs))
            k = futs.pop(f)
            try:
                assert f.result(timeout=30).outputs["y"][0, 0] == float(k)
                answered += 1
            except Exception as exc:
                errors.append(repr(exc)[:200])
        out.update(answered=answered, errors=errors, duplicates=c.stats.duplicates_dropped,
                   failovers=c.stats.failovers, last_master=c.master)

def status(admin):
    return AdminClient(admin, timeout=5).status()

def until(pred, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False

a, b = args["admins"]
if args["phase"] == "host-cut":  # one client given both masters, its master's host cut off mid-run
    out = {}
    load(",".join(args["frontends"]), args["n"], out, announce=True)
    print(json.dumps(out))
elif args["phase"] == "partitioned":
    outs = [{}, {}]
    ts = [threading.Thread(target=load, args=(fe, args["n"], o)) for fe, o in zip(args["frontends"], outs)]
    for t in ts:
        t.start()
    route = AdminClient(a, timeout=5).route("echo", split="0=100", sticky_key="user")
    for t in ts:
        t.join(60)
    silent = until(lambda: status(a)["master"]["peers"][0]["state"] == "silent", 5)
    time.sleep(1.0)  # several sync intervals: a route must not cross a cut link
    sa, sb = status(a), status(b)
    print(json.dumps({"loads": outs, "route_ok": route.get("ok"), "silent": silent,
                      "routes_a": sorted(sa["routes"]), "routes_b": sorted(sb["routes"]),
                      "books": [sa["books"], sb["books"]],
                      "credit": [[w["credit"] for w in s["workers"]] for s in (sa, sb)]}))
else:
    ok = until(lambda: "echo" in status(b)["routes"] and all(
        p["state"] == "up" for s in (status(a), status(b)) for p in s["master"]["peers"]), 15)
    sa, sb = status(a), status(b)
    print(json.dumps({"converged": ok, "routes": [sa["routes"], sb["routes"]],
                      "clocks": [sa["master"]["routes_clock"], sb["master"]["routes_clock"]]}))
'''


@pytest.fixture
def lab(tmp_path):
    reason = probe()
    if reason:
        pytest.skip(reason)
    try:
        lab = Lab(tmp_path)
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield lab
    finally:
        lab.close()
        assert lab.leftovers() == []


def blackhole(lab: Lab, src: str, dst: str, on: bool) -> None:
    subprocess.run(["ip", "-n", lab.hosts[src].ns, "route", "add" if on else "del", "blackhole",
                    f"{lab.hosts[dst].address}/32"], check=True, capture_output=True, text=True, timeout=10)


def test_a_cut_between_the_masters_is_no_split_brain_and_heals_by_itself(lab):
    for name in ("m1", "m2", "w", "c"):
        lab.add_host(name)
    ep = {m: {k: f"tcp://{lab.hosts[m].address}:{port}" for k, port in (("frontend", 5555), ("backend", 5556),
                                                                          ("admin", 5557))} for m in ("m1", "m2")}
    for m, peer in (("m1", "m2"), ("m2", "m1")):
        lab.start(m, "ringserve.launch.master", ["--frontend", ep[m]["frontend"], "--backend", ep[m]["backend"],
                                                 "--admin", ep[m]["admin"], "--peers", ep[peer]["admin"],
                                                 "--heartbeat-interval", "0.2", "--insecure"], m)
    lab.start("w", "ringserve.launch.worker", ["--master", f"{ep['m1']['backend']},{ep['m2']['backend']}",
                                               "--name", "w0", "--threads", "1", "--heartbeat-interval", "0.2",
                                               "--credit", "8",
                                               "--model", "echo=ringserve.worker.demo:slow,arg.delay=0.002"], "w0")
    common = {"admins": [ep["m1"]["admin"], ep["m2"]["admin"]],
              "frontends": [ep["m1"]["frontend"], ep["m2"]["frontend"]], "n": 300}
    ready = lab.run("c", [sys.executable, "-c", "import sys, time\nfrom ringserve.launch.procs import wait_for_workers\n"
                          "for a in sys.argv[1:]: wait_for_workers(a, 1, timeout=60)", *common["admins"]], timeout=90)
    assert ready.returncode == 0, ready.stderr[-2000:]

    blackhole(lab, "m1", "m2", True)
    blackhole(lab, "m2", "m1", True)
    out = lab.run("c", [sys.executable, "-c", DRIVER, json.dumps({**common, "phase": "partitioned"})], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for load in got["loads"]:  # clients of both sides: every request answered once, right
        assert load["answered"] == common["n"] and not load["errors"] and load["duplicates"] == 0, load
    assert got["route_ok"] and got["silent"], got
    assert got["routes_a"] == ["echo"] and got["routes_b"] == [], got  # the change stayed on its side
    assert all(b["ok"] and b["leaked"] == 0 for b in got["books"]), got
    assert got["credit"] == [[4], [4]], got  # each master within its share of the worker's 8

    blackhole(lab, "m1", "m2", False)
    blackhole(lab, "m2", "m1", False)
    out = lab.run("c", [sys.executable, "-c", DRIVER, json.dumps({**common, "phase": "healed"})], timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    healed = json.loads(out.stdout.strip().splitlines()[-1])
    assert healed["converged"], healed
    assert healed["routes"][0] == healed["routes"][1] and healed["clocks"][0] == healed["clocks"][1], healed

    # The serving master's host cut off (its link down) under load: the client moves to the other.
    drv = subprocess.Popen(["ip", "netns", "exec", lab.hosts["c"].ns, sys.executable, "-c", DRIVER,
                            json.dumps({**common, "phase": "host-cut", "n": 600})],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    try:
        on = json.loads(drv.stdout.readline())["on"]  # the driver says which master it started on
        victim, other = ("m1", "m2") if on == ep["m1"]["frontend"] else ("m2", "m1")
        time.sleep(1.0)
        lab.cut(victim)
        stdout, stderr = drv.communicate(timeout=120)
    finally:
        if drv.poll() is None:
            drv.kill()
        if victim:
            lab.restore(victim)
    assert drv.returncode == 0, stderr[-3000:]
    cut = json.loads(stdout.strip().splitlines()[-1])
    assert cut["answered"] == 600 and not cut["errors"] and cut["duplicates"] == 0, cut
    assert cut["failovers"] >= 1 and cut["last_master"] == ep[other]["frontend"], cut
