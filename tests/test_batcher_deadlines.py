"""Issue 22 (fourth round): the batcher skips a group whose soonest deadline is still ahead
(`Batcher.soonest`) instead of rebuilding every queue on every compute turn; whatever the order
of adds, batches and clock steps, take_expired still returns exactly the requests past their
deadline, each once, and every request leaves exactly once (a batch or TIMEOUT)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from ringserve.worker.batching import Batcher, WorkItem

pytestmark = pytest.mark.timeout(60)


def _item(rid: str, width: int, arrival: float, deadline: float) -> WorkItem:
    return WorkItem(rid, 1, "m", None, {"x": np.zeros((1, width), np.float32)}, 1, arrival, deadline)


@pytest.mark.parametrize("seed", range(20))
def test_take_expired_returns_exactly_the_requests_past_their_deadline(seed):
    rng = random.Random(seed)
    b = Batcher(max_batch_size=4, max_queue_delay_s=0.0)
    queued: dict[str, float] = {}  # rid -> deadline, what the batcher should hold
    left: list[str] = []
    now = 0.0
    for step in range(300):  # bounded: a fixed number of random operations
        op = rng.random()
        if op < 0.5:
            rid = f"r{step}"
            deadline = now + rng.choice([0.001, 0.01, 0.05, 1.0])
            b.add(_item(rid, rng.choice([3, 4]), now, deadline))  # two groups (trailing shapes)
            queued[rid] = deadline
        elif op < 0.75:
            batch, _ = b.next_batch(now)
            for i in batch:
                assert queued.pop(i.rid) is not None
                left.append(i.rid)
        else:
            now += rng.choice([0.0005, 0.005, 0.02])
            expired = sorted(i.rid for i in b.take_expired(now))
            assert expired == sorted(r for r, d in queued.items() if d <= now)
            for rid in expired:
                del queued[rid]
                left.append(rid)
        assert len(b) == len(queued)
    assert len(left) == len(set(left))  # nobody left twice
    b.take_expired(now + 10.0)
    assert len(b) == 0 and not b.soonest  # an empty batcher keeps no bookkeeping


@pytest.mark.parametrize("seed", range(10))
def test_rows_per_group_stay_exact_when_batches_leave(seed):
    """Issue 22 (sixth round): a batch leaving its group subtracts its rows instead of summing the
    queue again; with requests of several rows, adds, batches and expiries in any order, each
    group's row count is still the sum of its queue, and no batch goes past the limit but a lone
    request that alone holds more rows."""
    rng = random.Random(seed)
    b = Batcher(max_batch_size=8, max_queue_delay_s=0.0)
    now = 0.0
    for step in range(300):  # bounded: a fixed number of random operations
        op = rng.random()
        if op < 0.55:
            rows = rng.choice([1, 1, 2, 3, 9])
            item = WorkItem(f"r{step}", 1, "m", None, {"x": np.zeros((rows, rng.choice([3, 4])), np.float32)},
                            rows, now, now + rng.choice([0.01, 1.0]))
            b.add(item)
        elif op < 0.85:
            batch, _ = b.next_batch(now)
            assert len(batch) == 1 or sum(i.rows for i in batch) <= 8
        else:
            now += rng.choice([0.005, 0.02])
            b.take_expired(now)
        assert b.rows == {k: sum(i.rows for i in g) for k, g in b.groups.items()}


def test_work_item_has_no_per_instance_dict():
    """WorkItem uses slots (built once per request on the socket thread): a misspelt field fails loudly."""
    item = _item("r", 3, 0.0, 1.0)
    assert not hasattr(item, "__dict__")
    with pytest.raises(AttributeError):
        item.no_such_field = 1  # type: ignore[attr-defined]
