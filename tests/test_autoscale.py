"""master/autoscale.py: the desired-workers policy as a pure function (clock passed in), and the
figure a real master exports (status and the ringserve_desired_workers gauge)."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.launch.procs import wait_until
from ringserve.master.autoscale import AutoscalePolicy, Decision, decide, ongoing_per_worker

P = AutoscalePolicy(target_ongoing_requests=2, min_workers=1, max_workers=10, upscale_delay_s=30,
                    downscale_delay_s=600)


def run(policy, steps, workers=2, prev=None):
    """Feed (time, ongoing) steps through decide; return the desired figure after each."""
    out = []
    for now, ongoing in steps:
        prev = decide(policy, ongoing, workers, now, prev)
        out.append(prev.desired)
    return out, prev


def test_proposal_is_ongoing_over_target_within_bounds():
    assert [P.proposal(n) for n in (0, 1, 2, 3, 4, 5, 19, 20, 21, 1000)] == [1, 1, 1, 2, 2, 3, 10, 10, 10, 10]
    assert AutoscalePolicy(target_ongoing_requests=0.5, min_workers=0).proposal(0) == 0
    assert AutoscalePolicy(target_ongoing_requests=0.5, min_workers=0).proposal(3) == 6


def test_first_decision_starts_from_the_workers_there_are():
    assert decide(P, 0, 3, 0.0, None) == Decision(3, -1, 0.0)  # wants 1, but downscales wait
    assert decide(P, 4, 2, 0.0, None) == Decision(2)
    assert decide(P, 0, 50, 0.0, None).desired == 10  # clamped to max_workers


def test_upscale_waits_out_its_delay_then_takes_the_latest_proposal():
    figures, last = run(P, [(0, 4), (10, 8), (20, 12), (39.9, 12), (40, 12), (41, 12)])  # the wait began at 10
    assert figures == [2, 2, 2, 2, 6, 6]
    assert last == Decision(6)


def test_a_burst_shorter_than_the_delay_buys_nothing():
    figures, last = run(P, [(0, 4), (0, 20), (10, 20), (20, 4), (40, 20), (69, 20), (70, 20)])
    assert figures == [2, 2, 2, 2, 2, 2, 10]  # the return to 4 restarted the wait at 40


def test_downscale_waits_longer_and_a_flip_restarts_it():
    figures, _ = run(P, [(0, 4), (0, 0), (599, 0), (600, 0)])
    assert figures == [2, 2, 2, 1]
    figures, _ = run(P, [(0, 0), (300, 20), (301, 0), (900, 0), (901, 0)])
    assert figures == [2, 2, 2, 2, 1]  # up then down again: the downscale wait began at 301


def test_from_zero_workers_at_once():
    zero = AutoscalePolicy(min_workers=0, upscale_delay_s=30)
    prev = decide(zero, 0, 0, 0.0, None)
    assert prev == Decision(0)
    assert decide(zero, 5, 0, 1.0, prev) == Decision(3)  # ceil(5 / 2), no delay
    assert decide(zero, 5, 1, 1.0, Decision(1)).desired == 1  # with a worker the delay applies again


def test_zero_delays_follow_the_load_at_once():
    quick = AutoscalePolicy(target_ongoing_requests=1, upscale_delay_s=0, downscale_delay_s=0)
    assert run(quick, [(0, 5), (1, 2), (2, 0)])[0] == [5, 2, 1]


@pytest.mark.parametrize("bad", [dict(target_ongoing_requests=0), dict(min_workers=3, max_workers=2),
                                 dict(min_workers=-1), dict(upscale_delay_s=-1)])
def test_bad_policies_are_refused(bad):
    with pytest.raises(ValueError):
        AutoscalePolicy(**bad)


def test_ongoing_per_worker():
    assert ongoing_per_worker(6, 3) == 2.0 and ongoing_per_worker(4, 0) == 4.0


@pytest.mark.timeout(120)
def test_master_exports_desired_workers(cluster):
    """A real master: status and the metrics endpoint carry the figure and the per-worker load."""
    master = cluster.start_master("--metrics-port", "0")
    cluster.start_workers(2, model="echo=ringserve.worker.demo:slow,arg.delay=0.01")
    with Client(cluster.frontend, timeout=30) as c:
        assert c.infer("echo", {"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 4)
    admin = AdminClient(cluster.admin)
    # idle: the load asks for min_workers (1); the figure started from the workers registered at the
    # first refresh (1 or 2), and a downscale waits 600 s, so either is right here
    desired = wait_until(lambda: admin.status()["models"]["echo"].get("desired_workers"), 10, 0.1, "desired_workers")
    assert desired in (1, 2)
    url = master.info["metrics"]
    url = url if url.endswith("/metrics") else url.rstrip("/") + "/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert f'ringserve_desired_workers{{model="echo"}} {float(desired)}' in text
    assert 'ringserve_ongoing_requests_per_worker{model="echo"}' in text
