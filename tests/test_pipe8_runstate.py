"""bench/loadgen.runnable_shares (issue 22, seventh round): the run-state sampler that tells whether the
pipeline's stages overlap. A spinning process reads runnable in (nearly) every sample, a sleeping one in
none; the sampling is bounded in time and in samples, and both children are ended."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.loadgen import runnable_shares

pytestmark = pytest.mark.timeout(30)


def test_a_spinning_process_reads_runnable_and_a_sleeping_one_does_not():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(20)"])
    try:
        time.sleep(0.3)
        got = runnable_shares({"busy": busy.pid, "idle": idle.pid}, 0.3)
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait(5)
    assert 0 < got["samples"] <= 301
    assert got["by_role"]["busy"] >= 0.5 and got["by_role"]["idle"] == 0.0  # runnable: running or waiting for a core
    assert abs(sum(got["by_count"].values()) - 1.0) < 0.01 and set(got["by_count"]) <= {0, 1}
