"""Every role serves Prometheus metrics; scraped and parsed after real traffic."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringserve.client import Client, UnknownModel
from ringserve.client.params import ParamClient
from ringserve.launch.procs import wait_for_workers, wait_until
from ringserve.worker import demo

pytestmark = pytest.mark.timeout(150)


def scrape(url: str) -> dict[str, list]:
    """{sample name: [(labels, value), ...]} from one scrape."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict, name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


def test_every_role_serves_metrics_after_real_traffic(cluster):
    eps = cluster.start_shards(2, extra=("--metrics-port", "0"))
    cluster.start_master("--metrics-port", "0")
    state = {k: v.clone() for k, v in demo.mlp(seed=1).state_dict().items()}
    with ParamClient(eps) as pc:
        assert pc.publish("mlp", state) == 1
    cluster.start_workers(1, "--paramservers", ",".join(f"{n}={e}" for n, e in eps.items()),
                          "--max-batch-size", "4", "--metrics-port", "0", wait=False)
    wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
    x = np.ones((1, 256), np.float32)
    with Client(cluster.frontend, timeout=20) as c:
        for f in [c.infer_async("mlp", {"x": x}) for _ in range(20)]:
            assert f.result().version == 1
        with pytest.raises(UnknownModel):
            c.infer("no-such-model", {"x": x})

    master = scrape(cluster.master.info["metrics"])
    assert value(master, "ringserve_requests_total", model="mlp", version="1", outcome="ok") == 20
    assert value(master, "ringserve_requests_total", outcome="UNKNOWN_MODEL") == 1
    assert not any(lab.get("model") == "no-such-model" for lab, _ in master["ringserve_requests_total"])
    assert value(master, "ringserve_request_duration_seconds_count", model="mlp") == 20
    assert value(master, "ringserve_queue_duration_seconds_count", model="mlp") >= 20
    assert value(master, "ringserve_dispatch_policy_info", policy="least-outstanding") == 1
    assert "process_cpu_seconds_total" in master and "process_resident_memory_bytes" in master
    assert wait_until(lambda: "ringserve_worker_in_flight" in scrape(cluster.master.info["metrics"]), 5)

    worker_url = cluster.workers[0].info["metrics"]
    assert wait_until(lambda: value(scrape(worker_url), "ringserve_model_version", model="mlp") == 1, 10)
    worker = scrape(worker_url)
    assert value(worker, "ringserve_model_ready", model="mlp") == 1
    assert value(worker, "ringserve_worker_requests_total", model="mlp", outcome="ok") == 20
    assert value(worker, "ringserve_worker_batch_size_sum", model="mlp") == 20
    assert value(worker, "ringserve_worker_queue_duration_seconds_count", model="mlp") == 20  # one per request
    assert value(worker, "ringserve_weight_swaps_total", model="mlp") >= 1
    assert value(worker, "ringserve_worker_compute_duration_seconds_count", model="mlp") >= 5

    for proc in cluster.shards.values():
        shard = scrape(proc.info["metrics"])
        assert value(shard, "ringserve_shard_commands_total", cmd="commit", outcome="ok") == 1
        assert value(shard, "ringserve_shard_fetch_bytes_total") > 0
        assert wait_until(lambda proc=proc: value(scrape(proc.info["metrics"]), "ringserve_shard_current_version",
                                        model="mlp") == 1, 5)
    stored = sum(value(scrape(p.info["metrics"]), "ringserve_shard_bytes_stored") for p in cluster.shards.values())
    assert stored >= sum(t.numel() * 4 for t in state.values())
