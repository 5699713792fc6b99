"""Counters exist from the start (0), so a dashboard reads 0 rather than "No data" (issue 16, item 18)."""
from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client import generate_latest

from ringserve.master.metrics import EVICTION_REASONS, MasterMetrics
from ringserve.paramserver.metrics import ShardMetrics
from ringserve.protocol.messages import SHARD_COMMANDS
from ringserve.worker.metrics import WorkerMetrics

pytestmark = pytest.mark.timeout(60)


def samples(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(ringserve_\S+) (\S+)$", text, re.M)}


def test_master_counters_start_at_zero():
    m = MasterMetrics("least-outstanding")
    got = samples(generate_latest(m.registry).decode())
    for reason in EVICTION_REASONS:
        assert got[f'ringserve_worker_evictions_total{{reason="{reason}"}}'] == 0
    assert got["ringserve_late_replies_total"] == 0
    assert 'ringserve_retries_total{model="mlp"}' not in got  # no model served yet: no series
    m.refresh({"mlp": 0}, {}, {"ready": 1})
    got = samples(generate_latest(m.registry).decode())
    assert got['ringserve_retries_total{model="mlp"}'] == 0
    m.on_retry("mlp")
    m.refresh({"mlp": 0}, {}, {"ready": 1})  # seen again: not reset
    assert samples(generate_latest(m.registry).decode())['ringserve_retries_total{model="mlp"}'] == 1


def test_worker_counters_start_at_zero_per_model():
    w = WorkerMetrics()
    w.refresh({"mlp": {"version": 1, "ready": True}})
    got = samples(generate_latest(w.registry).decode())
    for name in ("weight_swaps", "weight_refusals", "model_loads", "model_evictions"):
        assert got[f'ringserve_{name}_total{{model="mlp"}}'] == 0, name
    assert got['ringserve_worker_requests_total{model="mlp",outcome="ok"}'] == 0
    w.on_swap("mlp", 0.01)
    w.refresh({"mlp": {"version": 2, "ready": True}})
    assert samples(generate_latest(w.registry).decode())['ringserve_weight_swaps_total{model="mlp"}'] == 1


def test_shard_counters_start_at_zero():
    got = samples(generate_latest(ShardMetrics("ps0").registry).decode())
    for cmd in SHARD_COMMANDS:
        assert got[f'ringserve_shard_commands_total{{cmd="{cmd}",outcome="ok"}}'] == 0
    assert got["ringserve_shard_fetch_bytes_total"] == 0


def test_a_fresh_master_serves_zero_evictions_over_http(cluster):
    master = cluster.start_master("--metrics-port", "0")
    with urllib.request.urlopen(master.info["metrics"], timeout=10) as r:
        got = samples(r.read().decode())
    assert all(got[f'ringserve_worker_evictions_total{{reason="{x}"}}'] == 0 for x in EVICTION_REASONS)
