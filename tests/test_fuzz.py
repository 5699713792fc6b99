"""Seeded, bounded fuzz of every socket (issue 10's "Done means"): ~2,000 mutated messages per
socket; afterwards every process is alive, a good request succeeds, and every message that
deserves an answer got one. bench/fuzz.py runs the same code at 20,000 per socket."""
from __future__ import annotations

import pytest

from bench.fuzz import run_target

COUNT = 2000
SEED = 1

CASES = [
    "client",  # the master's three sockets
    "worker",
    "admin",
    "shard",
    "agent",  # a real worker fed by a fake master
    "replies",  # the master's worker port as a registered worker: mutated REPLY batches to real requests
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("target", CASES)
def test_fuzz_socket(target, tmp_path):
    res = run_target(target, COUNT, SEED, tmp_path / target, budget_s=90)
    assert res["crashes"] == 0, res
    assert res["sent"] == COUNT, res
    assert res["unanswered"] == 0, res
    assert res["good_ok"], res
    assert res.get("credit_leaked", 0) == 0 and res.get("duplicated", 0) == 0, res
    if "books" in res:  # the invariant every fault and fuzz test ends with
        assert res["books"]["ok"] and res["books"]["pending"] == 0, res
