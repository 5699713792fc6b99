"""bench/schedline.py (issue 22, tenth round): the scheduler timeline's parser and its figures, on a
fixed `perf sched timehist` text (two CPUs; the master's loop alone, then beside the worker's
compute thread, then the worker alone), so the shares it reports are checked against known slices."""
from __future__ import annotations

import pytest

from bench.schedline import label_threads, parse_timehist, summarize, timeline, wave_offsets

pytestmark = pytest.mark.timeout(30)

# time (end of slice)  cpu  task  wait  sched delay  run (ms); the header lines and <idle> are skipped
TEXT = """\
           time    cpu  task name                       wait time  sch delay   run time
                        [tid/pid]                          (msec)     (msec)     (msec)
--------------- ------  ------------------------------  ---------  ---------  ---------
      10.001000 [0000]  python[100]                         0.000      0.010      1.000
      10.001000 [0001]  <idle>                              0.000      0.000      1.000
      10.002000 [0000]  python[100]                         0.000      0.020      1.000
      10.002000 [0001]  python[202/200]                     0.000      0.030      1.000
      10.002500 [0001]  ZMQbg/IO/0[201/200]                 0.000      0.040      0.500
      10.002600 [0000]  perf[999]                           0.000      0.000      0.100
      10.004000 [0001]  python[200]                         0.000      0.050      1.000
      10.004000 [0000]  ZMQbg/IO/0[301/300]                 0.000      0.000      0.400
      10.004100 [0000]  python[300]                                                      awakened: python[100]
"""


def test_the_slices_are_read_and_labelled_by_role():
    rows = parse_timehist(TEXT)
    assert len(rows) == 7  # <idle>, the header and the wake-up line are not slices
    start, end, name, tid, pid, sch = rows[3]
    assert (name, tid, pid) == ("ZMQbg/IO/0", "201", 200) and abs(end - start - 0.0005) < 1e-9 and sch == 0.040
    labels = label_threads(rows, master=100, worker=200, loads=[300])
    assert labels == {"100": "M.main", "202": "W.comp", "201": "W.io", "200": "W.main", "301": "C0.io"}


def test_busy_shares_and_who_ran_alone():
    rows = parse_timehist(TEXT)
    got = summarize(rows, label_threads(rows, master=100, worker=200, loads=[300]))
    assert got["window_s"] == 0.004  # 10.000 to 10.004; perf's own slice is not ours
    # 0-1 ms the master alone; 1-2 it and W.comp; 2-2.5 W.io alone; 2.5-3 none of ours; 3-3.6 W.main
    # alone; 3.6-4 W.main and C0.io
    assert got["alone_ms"] == {"M.main": 1.0, "W.main": 0.6, "W.io": 0.5}
    assert got["cpus_busy"] == {0: 0.125, 1: 0.525, 2: 0.35}
    assert got["threads"]["M.main"] == {"run_ms": 2.0, "slices": 2, "mean_slice_us": 1000.0,
                                        "mean_sched_delay_us": 15.0, "max_sched_delay_us": 20.0}
    rows_out = timeline(rows, label_threads(rows, 100, 200, [300]), 0.0, 4.0).splitlines()
    assert rows_out[0].startswith("C0.io   |") and rows_out[0].endswith("#" * 4) and len(rows_out) == 6


def _bursts(starts_ms: list[float], tid: str, pid: int) -> str:
    return "".join(f"      {10 + (t + 0.2) / 1000:.6f} [0000]  python[{tid}/{pid}]"
                   "                     0.000      0.010      0.200\n" for t in starts_ms)


def test_waves_read_merged_when_the_clients_run_together_and_apart_when_half_a_cycle_apart():
    c0 = _bursts([0, 4, 8, 12, 16], "400", 400)
    together = parse_timehist(c0 + _bursts([0.1, 4.1, 8.1, 12.1, 16.1], "500", 500))
    apart = parse_timehist(c0 + _bursts([2, 6, 10, 14, 18], "500", 500))
    labels = {"400": "C0.main", "500": "C1.main"}
    got = wave_offsets(together, labels)
    assert got["cycle_ms"] == 4.0 and got["merged_share"] == 1.0 and abs(got["offset_median_ms"] - 0.1) < 1e-6
    got = wave_offsets(apart, labels)
    assert got["cycle_ms"] == 4.0 and got["merged_share"] == 0.0 and got["offset_median_ms"] == 2.0
