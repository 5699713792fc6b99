"""The status table says what is true: a model waiting for its weights, an on-demand model not
loaded, "ready vN", a refusal only while it is news (cleared once a rollback makes the served
version current again), and per-model request rate and latency over the last minute, the same
in the table and in --json."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ringserve.client import Client
from ringserve.client.admin import AdminClient, format_status
from ringserve.client.params import ParamClient
from ringserve.launch.procs import wait_until
from ringserve.master.status import live_refusal, model_state, model_summary
from ringserve.master.window import RING, SPAN_S, ModelWindow, Windows, percentile
from helpers import mlp_state, shard_list

pytestmark = pytest.mark.timeout(240)


# ------------------------------------------------------------------ pure
@pytest.mark.parametrize("info,state", [
    ({"version": 3, "ready": True}, "ready v3"),
    ({"version": None, "ready": False}, "waiting for weights"),
    ({"version": None, "ready": False, "on_demand": True}, "on demand (not loaded)"),
    ({"version": 3, "ready": True, "refused": {"version": 4, "reason": "x"}}, "refused v4 (serving v3)"),
    ({"version": 4, "ready": True, "refused": {"version": 4, "reason": "x"}}, "ready v4"),  # served now: over
    ({"version": 5, "ready": True, "refused": {"version": 4, "reason": "x"}}, "ready v5"),
    ({"version": None, "ready": False, "refused": {"version": 2, "reason": "x"}}, "refused v2 (nothing to serve)"),
    ({"version": None, "ready": False, "on_demand": True, "refused": {"version": 2, "reason": "x"}},
     "on demand (not loaded), refused v2"),
])
def test_model_state_in_words(info, state):
    assert model_state(info) == state
    assert (live_refusal(info) is None) == ("refused" not in state)


def test_model_summary_prefers_what_serves():
    class W:
        def __init__(self, models):
            self.models = models

    ws = [W({"m": {"version": None, "ready": False}}), W({"m": {"version": 1, "ready": True}})]
    assert model_summary("m", ws) == {"state": "ready", "workers_ready": 1, "workers": 2}
    assert model_summary("m", ws[:1])["state"] == "waiting for weights"
    assert model_summary("m", [W({"m": {"version": None, "ready": False, "on_demand": True}})])["state"] == \
        "on demand (not loaded)"
    assert model_summary("m", [])["state"] == "no worker"


def test_window_rate_and_percentiles_are_over_the_recent_span_and_bounded():
    w = ModelWindow()
    for i in range(100):  # 100 answers over 10 s, latencies 1..100 ms
        w.record(1000.0 + i * 0.1, (i + 1) / 1000.0)
    s = w.summary(1010.0)
    assert s["rate_per_s"] == 10.0 and s["p50_ms"] == 50.0 and s["p99_ms"] == 99.0
    w.record(1010.0, None)  # an error: counted in the rate, not in the latencies
    assert w.summary(1010.0)["p50_ms"] == 50.0
    later = w.summary(1000.0 + 10 + SPAN_S + 1)  # a minute later nothing is recent
    assert later == {"rate_per_s": 0.0, "p50_ms": None, "p99_ms": None}
    for i in range(5 * RING):  # the ring never grows
        w.record(2000.0 + i * 0.001, 0.005)
    assert len(w.lat) == RING and w.summary(2000.0 + 5 * RING * 0.001)["p99_ms"] == 5.0
    assert percentile([], 0.5) is None and percentile([1.0], 0.99) == 1.0
    assert Windows().summary("nothing", 0.0)["rate_per_s"] == 0.0


def test_format_status_shows_states_rate_and_latency():
    st = {"epoch": "e", "policy": "p", "uptime_s": 1, "pending": 0,
          "workers": [{"name": "w0", "state": "ready", "device": "cpu", "credit": 4, "in_flight": 0, "done": 3,
                       "heartbeat_age_s": 0.1, "stats": {},
                       "models": {"a": {"version": 3, "ready": True, "state": "refused v4 (serving v3)",
                                        "refused": {"version": 4, "reason": "bad shapes"}},
                                  "b": {"version": None, "ready": False, "on_demand": True,
                                        "state": "on demand (not loaded)"}}}],
          "models": {"a": {"queue_depth": 0, "in_flight": 0, "requests": 9, "ok": 9, "retries": 0, "versions": [3],
                           "state": "ready", "workers_ready": 1, "workers": 1, "rate_per_s": 2.5, "p50_ms": 1.25,
                           "p99_ms": 7.5}}}
    out = format_status(st)
    assert "a: refused v4 (serving v3)" in out and "b: on demand (not loaded)" in out
    assert "vNone" not in out and "not ready" not in out
    assert "REFUSED VERSIONS" in out and "bad shapes" in out
    header = next(line for line in out.splitlines() if line.startswith("MODEL "))
    row = next(line for line in out.splitlines() if line.startswith("a "))
    for col, value in (("REQ/S", "2.5"), ("P50 MS", "1.2"), ("P99 MS", "7.5"), ("READY", "1/1")):
        assert col in header and value in row


# ------------------------------------------------------------------ real processes
def test_status_says_waiting_on_demand_ready_refused_and_clears_after_rollback(cluster):
    eps = cluster.start_shards(1)
    cluster.start_master()
    cluster.start_workers(1, "--paramservers", shard_list(eps), names=["wait"], wait=False)
    cluster.start_workers(1, "--paramservers", shard_list(eps), "--max-models", "1", names=["lazy"], wait=False)
    admin = AdminClient(cluster.admin, timeout=2.0)

    def worker_states():
        st = admin.status()
        return {w["name"]: w["models"]["mlp"]["state"] for w in st["workers"]} if len(st["workers"]) == 2 else None

    states = wait_until(worker_states, 60, 0.1, "two workers registered")
    assert states == {"wait": "waiting for weights", "lazy": "on demand (not loaded)"}
    st = admin.status()
    assert st["models"]["mlp"]["state"] == "on demand (not loaded)" and st["models"]["mlp"]["workers_ready"] == 0

    x = np.random.default_rng(0).standard_normal((2, 256), dtype=np.float32)
    v1 = mlp_state(1)
    with ParamClient(eps) as pc:
        pc.publish("mlp", v1)
        wait_until(lambda: worker_states()["wait"] == "ready v1", 60, 0.1, "ready v1")
        with Client(cluster.frontend, timeout=20) as c:
            for _ in range(20):
                c.infer("mlp", {"x": x})
        m = admin.status()["models"]["mlp"]
        assert m["rate_per_s"] > 0 and 0 < m["p50_ms"] <= m["p99_ms"] and m["state"] == "ready"

        bad = {"net.0.weight": (v1["net.0.weight"] + 1.0).numpy()}  # a layout no worker can load
        assert pc.publish("mlp", bad, allow_layout_change=True, check_workers=False) == 2
        wait_until(lambda: worker_states()["wait"] == "refused v2 (serving v1)", 60, 0.1, "refusal reported")
        out = subprocess.run([sys.executable, "-m", "ringserve.launch.admin", "status", "--master", cluster.admin],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "mlp: refused v2 (serving v1)" in out.stdout, out.stdout
        assert "REQ/S" in out.stdout and "P99 MS" in out.stdout and "vNone" not in out.stdout

        pc.rollback("mlp", 1)  # v1 is current again: the refusal is over
        wait_until(lambda: worker_states()["wait"] == "ready v1", 60, 0.1, "refusal cleared by the rollback")
    out = subprocess.run([sys.executable, "-m", "ringserve.launch.admin", "status", "--master", cluster.admin,
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    wait_info = next(w for w in st["workers"] if w["name"] == "wait")["models"]["mlp"]
    assert wait_info["state"] == "ready v1" and "refused" not in wait_info
    m = st["models"]["mlp"]
    assert {"state", "workers_ready", "workers", "rate_per_s", "p50_ms", "p99_ms"} <= set(m)
    assert m["requests"] == 20 and m["p50_ms"] is not None
