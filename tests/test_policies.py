"""Each scheduling policy spreads 1,000 requests over 3 real workers as it should."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ringserve.client import Client

pytestmark = pytest.mark.timeout(120)
N = 1000


def spread(address: str, model: str, n: int = N, window: int = 6) -> Counter:
    """Send n requests keeping at most `window` in flight; count which worker answered each."""
    counts: Counter = Counter()
    x = {"x": np.ones((1, 4), np.float32)}
    with Client(address, timeout=20) as c:
        inflight = []
        for _ in range(n):
            inflight.append(c.infer_async(model, x))
            if len(inflight) >= window:
                counts[inflight.pop(0).result().worker] += 1
        for f in inflight:
            counts[f.result().worker] += 1
    return counts


def start(cluster, policy: str, *master_args: str, model="echo=ringserve.worker.demo:noop"):
    cluster.start_master("--policy", policy, "--seed", "5", *master_args)
    cluster.start_workers(3, "--credit", "4", names=["a", "b", "c"], model=model)


def test_round_robin_exact_counts(cluster):
    start(cluster, "round-robin")
    assert spread(cluster.frontend, "echo") == {"a": 334, "b": 333, "c": 333}


def test_weighted_random_follows_weights(cluster):
    start(cluster, "weighted-random", "--weight", "a=1", "--weight", "b=2", "--weight", "c=5")
    counts = spread(cluster.frontend, "echo", window=1)  # every worker always has credit
    for name, w in (("a", 1), ("b", 2), ("c", 5)):
        assert abs(counts[name] / N - w / 8) < 0.05, counts


@pytest.mark.parametrize("policy", ["random", "power-of-two"])
def test_random_policies_use_every_worker(cluster, policy):
    start(cluster, policy)
    counts = spread(cluster.frontend, "echo")
    assert sum(counts.values()) == N and all(counts[w] > N * 0.2 for w in "abc"), counts


def test_least_outstanding_prefers_idle_worker(cluster):
    start(cluster, "least-outstanding", model="slow=ringserve.worker.demo:slow,arg.delay=0.15")
    with Client(cluster.frontend, timeout=20) as c:
        for _ in range(3):  # waves of 3 concurrent slow requests: one per idle worker, never two on one
            wave = [c.infer_async("slow", {"x": np.ones((1, 2), np.float32)}) for _ in range(3)]
            assert sorted(f.result().worker for f in wave) == ["a", "b", "c"]
    cluster.procs[-1].stop()  # keep the rest quick: the 1,000 go to a fast model on fresh workers


def test_least_outstanding_spreads_1000(cluster):
    start(cluster, "least-outstanding")
    counts = spread(cluster.frontend, "echo", window=3)
    assert sum(counts.values()) == N and all(counts[w] > N * 0.2 for w in "abc"), counts
