"""The master process's cyclic GC after start-up (issue 22, eighth round): `serve` calls
`settle_gc`, which freezes what start-up built out of later collections and raises generation 0's
threshold. The GC stays on: cycles made after it are still freed. Run in a child process (the
settings are process-wide and must not leak into the test process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

_CHILD = r"""
import gc, json, weakref
from ringserve.master.broker import GC_YOUNG_THRESHOLD, settle_gc

class Node:
    pass

older = gc.get_threshold()[1:]
settle_gc()
frozen = gc.get_freeze_count()
after = gc.get_threshold()
refs = []
for _ in range(3 * GC_YOUNG_THRESHOLD):  # cycles made while serving: more than one young generation's worth
    a, b = Node(), Node()
    a.other, b.other = b, a
    refs.append(weakref.ref(a))
    del a, b
alive_before = sum(r() is not None for r in refs)
gc.collect()
alive_after = sum(r() is not None for r in refs)
print(json.dumps({"enabled": gc.isenabled(), "frozen": frozen, "threshold": after, "older": older,
                  "young": GC_YOUNG_THRESHOLD, "alive_before": alive_before, "alive_after": alive_after,
                  "made": len(refs)}))
"""


def test_settle_gc_freezes_start_up_and_keeps_collecting_cycles():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=50, env=env,
                         check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["enabled"] is True
    assert got["frozen"] > 0  # start-up's objects (modules, classes, the books' structures) are frozen
    assert got["threshold"] == [got["young"], *got["older"]]  # generation 0 raised, 1 and 2 as they were
    # the young generation's collections still ran while the cycles were made: at most about one
    # generation's worth waited for the explicit collect, which freed the rest
    assert got["alive_before"] <= 2 * got["young"] < got["made"]
    assert got["alive_after"] == 0
