"""Issue 22 (sync13): a shard holds only its current version's (and live stages') pieces in memory;
superseded kept versions are served from their piece files, mapped read-only, so their received
buffers are freed and the next stage's frames reuse that memory.

The store tests drive paramserver/store.py on a temporary directory; the fetch test starts real
shards on 127.0.0.1 ephemeral ports (conftest's `cluster`).
"""
from __future__ import annotations

import mmap
import time

import numpy as np
import pytest

from ringserve.client.params import ParamClient
from ringserve.paramserver.store import PIECES, ShardStore
from ringserve.paramserver.shard import PRUNE_WITHIN_S
from helpers import mlp_state
from test_shard_pieces import fetch, make_slice

pytestmark = pytest.mark.timeout(120)


def _is_mapped(a: np.ndarray) -> bool:
    b = a
    while isinstance(b, np.ndarray):
        b = b.base
    return isinstance(b.obj if isinstance(b, memoryview) else b, mmap.mmap)


def test_a_prune_maps_the_superseded_versions_and_keeps_the_current_one_in_memory(tmp_path):
    rng = np.random.default_rng(3)
    vs = {v: {f"w{i}": rng.standard_normal(300).astype(np.float32) for i in range(3)} for v in (1, 3)}
    vs[2] = dict(vs[1], w0=vs[1]["w0"] + 1)  # a delta on v1: shares w1, w2
    store = ShardStore(tmp_path, keep=3)
    for v in (1, 2, 3):
        store.commit("m", make_slice(v, vs[v]), prune=False)
    store.prune("m")
    sl = store.slices["m"]
    assert store.current["m"] == 3
    assert not any(_is_mapped(a) for a in sl[3].data.values())  # the current version stays in memory
    for v in (1, 2):
        for k, a in sl[v].data.items():
            assert _is_mapped(a) and not a.flags.writeable
            np.testing.assert_array_equal(a, vs[v][k])
    assert sl[1].data["w1"] is sl[2].data["w1"]  # a piece two versions share is mapped once
    store.commit("m", make_slice(4, dict(vs[3], w2=vs[3]["w2"] * 2)), prune=False)
    store.prune("m")  # v1 dropped, its file deleted; v3's pieces v4 does not share are mapped now
    assert set(store.slices["m"]) == {2, 3, 4}
    assert _is_mapped(store.slices["m"][3].data["w2"]) and not _is_mapped(store.slices["m"][3].data["w0"])
    assert not any(_is_mapped(a) for a in store.slices["m"][4].data.values())
    assert set(store.mapped["m"]) <= store.stored["m"]
    np.testing.assert_array_equal(store.slices["m"][3].data["w2"], vs[3]["w2"])


def test_a_piece_whose_file_is_not_as_long_as_its_array_stays_in_memory(tmp_path):
    rng = np.random.default_rng(4)
    store = ShardStore(tmp_path, keep=3)
    a1 = {"w": rng.standard_normal(100).astype(np.float32)}
    store.commit("m", make_slice(1, a1), prune=False)
    store.commit("m", make_slice(2, {"w": a1["w"] + 1}), prune=False)
    c = store.slices["m"][1].checksums["w"]
    with open(tmp_path / "m" / PIECES / c, "ab") as f:
        f.write(b"x")
    store.prune("m")
    assert not _is_mapped(store.slices["m"][1].data["w"])
    np.testing.assert_array_equal(store.slices["m"][1].data["w"], a1["w"])


def test_a_superseded_version_is_fetched_whole_from_its_mapped_files(cluster):
    """v1 and v2 superseded by v3 are mapped by the prune a commit leaves for an idle moment (at
    the latest PRUNE_WITHIN_S after it): fetches before and after that serve the same bytes."""
    eps = cluster.start_shards(2)
    v1 = {k: v.numpy() for k, v in mlp_state(1).items()}
    with ParamClient(eps, chunk_bytes=64 * 1024) as pc:
        pc.publish("mlp", v1)
        pc.publish("mlp", {k: a + 1 for k, a in v1.items()})
        pc.publish("mlp", {k: a * 3 for k, a in v1.items()})
    end = time.monotonic() + PRUNE_WITHIN_S + 1.0
    for _ in range(20):  # bounded: the last fetches come after every shard's prune is due
        new, _ = fetch(eps, "mlp", 1)
        for k, a in v1.items():
            np.testing.assert_array_equal(new.flat[k].reshape(a.shape), a)
        if time.monotonic() > end:
            break
        time.sleep(0.3)


def test_a_restart_holds_the_current_version_in_memory_and_maps_the_others(tmp_path):
    rng = np.random.default_rng(6)
    vs = {v: {"w": rng.standard_normal(200).astype(np.float32)} for v in (1, 2)}
    store = ShardStore(tmp_path, keep=3)
    for v in (1, 2):
        store.commit("m", make_slice(v, vs[v]))
    again = ShardStore(tmp_path, keep=3)
    again.load_all()
    assert again.current["m"] == 2 and not again.corrupt
    assert _is_mapped(again.slices["m"][1].data["w"]) and not _is_mapped(again.slices["m"][2].data["w"])
    for v in (1, 2):
        np.testing.assert_array_equal(again.slices["m"][v].data["w"], vs[v]["w"])
