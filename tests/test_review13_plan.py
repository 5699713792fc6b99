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


@pytest.mark.timeout(120)
def test_a_worker_serves_a_republish_in_other_chunks_as_published(cluster):
    """The same through real shards and a worker: v1 published in 12 KiB pieces, v2 in 4 KiB ones,
    v2's net.4.weight#3 ([3072, 4096)) holding v1's net.4.weight#3 bytes ([9216, 10240))."""
    from ringserve.client import Client
    from ringserve.client.params import ParamClient
    from ringserve.launch.procs import wait_for_workers
    from helpers import expected, mlp_state, shard_list

    eps = cluster.start_shards(1)
    cluster.start_master()
    v1 = mlp_state(1)
    v2 = {k: t.clone() for k, t in v1.items()}
    flat1, flat2 = v1["net.4.weight"].view(-1), v2["net.4.weight"].view(-1)
    flat2[3072:4096] = flat1[9216:10240]
    x = np.random.default_rng(0).standard_normal((4, 256), dtype=np.float32)
    with ParamClient(eps, chunk_bytes=12 * 1024) as pc:
        assert pc.publish("mlp", v1) == 1
    cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False)
    wait_for_workers(cluster.admin, 1, 60, model="mlp", version=1)
    with ParamClient(eps, chunk_bytes=4 * 1024) as pc:
        assert pc.publish("mlp", v2) == 2
    wait_for_workers(cluster.admin, 1, 60, model="mlp", version=2)
    with Client(cluster.frontend, timeout=20) as c:
        r = c.infer_async("mlp", {"x": x}).result()
    assert r.version == 2
    np.testing.assert_allclose(r.outputs["logits"], expected(v2, x), rtol=1e-4, atol=1e-5)


def _published_many(arrays: dict[str, np.ndarray], per: dict[str, int], shards: int) -> dict[str, list]:
    """Manifests of `arrays` (param -> flat float32), each param in pieces of per[param] elements,
    every piece listed by one shard (round robin) and, for every other piece, by a second one too."""
    out: dict[str, list] = {f"s{i}": [] for i in range(shards)}
    k = 0
    for name, arr in sorted(arrays.items()):
        for p in split(name, "float32", arr.shape, 4, chunk_bytes=per[name] * 4):
            entry = [*p.as_list(), checksum(memoryview(arr[p.start:p.stop]).cast("B"))]
            out[f"s{k % shards}"].append(entry)
            if shards > 1 and k % 2:
                out[f"s{(k + 1) % shards}"].append(list(entry))
            k += 1
    return out


def _replies_many(arrays: dict[str, np.ndarray], manifests: dict[str, list]) -> dict:
    return {s: ({"pieces": items}, [arrays[i[1]][i[4]:i[5]].tobytes() for i in items])
            for s, items in manifests.items()}


def test_any_sequence_of_versions_in_any_chunks_is_assembled_as_published():
    """Property: whatever a version changes and whatever chunks each publish uses, the version a
    plan assembles on top of the held one is the published content, and the held one is untouched."""
    from hypothesis import given, settings, strategies as st

    values = st.integers(0, 3)  # few values: pieces of equal content (equal checksums) are common

    @st.composite
    def versions(draw):
        sizes = draw(st.lists(st.integers(1, 24), min_size=1, max_size=3))
        out = []
        for _ in range(draw(st.integers(2, 4))):
            arrays = {f"t{i}": np.array(draw(st.lists(values, min_size=n, max_size=n)), np.float32)
                      for i, n in enumerate(sizes)}
            per = {name: draw(st.integers(1, 8)) for name in arrays}
            out.append((arrays, per, draw(st.integers(1, 3))))
        return out

    @settings(max_examples=150, deadline=None)
    @given(versions())
    def check(seq):
        held = None
        for arrays, per, shards in seq:
            manifests = _published_many(arrays, per, shards)
            before = None if held is None else {k: a.copy() for k, a in held.flat.items()}
            new = assemble(manifests, _replies_many(arrays, manifests), held)
            for name, arr in arrays.items():
                np.testing.assert_array_equal(new.flat[name], arr)
            if held is not None:
                for k, a in held.flat.items():
                    np.testing.assert_array_equal(a, before[k])
            again = assemble(_published_many(arrays, per, shards), {}, new)  # the same version: nothing asked
            for name, arr in arrays.items():
                assert again.flat[name] is new.flat[name]
            held = new

    check()
