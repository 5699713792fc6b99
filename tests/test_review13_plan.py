"""Review of issue 22's delta path (review13): a delta's plan keeps a held piece only where it is
the very piece the held version had, its checksum *and* its place; and what a plan shares is
what the shards' checksums say."""
from __future__ import annotations

import numpy as np
import pytest

from ringserve.protocol.digest import checksum
from ringserve.protocol.placement import split
from ringserve.worker.sync import assemble, plan_version

pytestmark = pytest.mark.timeout(60)


def _published(arr: np.ndarray, per: int) -> dict[str, list]:
    """The one-shard manifest a publisher with --chunk-bytes = per elements writes for `arr` as "w"."""
    pieces = split("w", "float32", arr.shape, 4, chunk_bytes=per * 4)
    return {"s0": [[*p.as_list(), checksum(memoryview(arr[p.start:p.stop]).cast("B"))] for p in pieces]}


def _replies(arr: np.ndarray, manifests: dict[str, list]) -> dict:
    items = manifests["s0"]
    return {"s0": ({"pieces": items}, [arr[i[4]:i[5]].tobytes() for i in items])}


def test_a_republish_with_other_chunks_never_takes_a_held_piece_of_its_key_from_another_place():
    # v1 in pieces of 4 elements: w#2 is [8, 10); v2 in pieces of 2: w#2 is [4, 6), and its content
    # is v1's [8, 10) (same bytes, same checksum). The held bytes at [4, 6) are v1's, not those.
    v1 = np.arange(10, dtype=np.float32)
    m1 = _published(v1, 4)
    held = assemble(m1, _replies(v1, m1), None)
    v2 = v1.copy()
    v2[4:6] = v1[8:10]
    m2 = _published(v2, 2)
    assert [i[:1] + i[4:6] for i in m2["s0"]][2] == ["w#2", 4, 6] and m2["s0"][2][6] == m1["s0"][2][6]
    _, need = plan_version(m2, held)
    assert "w#2" in [p.key for items in need.values() for p, _ in items]  # fetched, not copied from [4, 6)
    new = assemble(m2, _replies(v2, m2), held)
    np.testing.assert_array_equal(new.flat["w"], v2)
    np.testing.assert_array_equal(held.flat["w"], v1)  # the held version untouched
    again = assemble(_published(v2, 2), {}, new)  # the same chunks again: every piece kept, nothing asked
    assert again.flat["w"] is new.flat["w"]
