"""Issue 22 (fifth round): a batch's answers packed with their shared fields once
(worker/handoff.py `batch_outputs`, `joined_header`) are the answers the general path packs one by
one: the same header map, the same output bytes, for every shape of batch the fast path takes, and
the general path still takes every batch the fast path must not (outputs out of line, strings,
bytes the codec would convert, a model that returns the wrong number of rows)."""
from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from ringserve.protocol.codec import INLINE_MAX, decode_tensors, encode_tensors, pack, unpack, unpack_map
from ringserve.protocol.envelope import split_replies
from ringserve.worker.batching import Batcher, WorkItem, signature, split_outputs
from ringserve.worker.compute import ComputeThread
from ringserve.worker.handoff import batch_outputs, joined_header, result_frames, shared_fields
from ringserve.worker.loader import ServedModel, parse_model_arg

pytestmark = pytest.mark.timeout(120)


def _item(i: int, rows: int, link: int = 0, timing: dict | None = None) -> WorkItem:
    x = np.full((rows, 256), float(i), np.float32)
    return WorkItem(f"k{i}", 1 + i % 3, "mlp", None, {"x": x}, rows, arrival=0.0, deadline=1e9,
                    cid=None if i % 2 else f"c{i}", link=link, timing=dict(timing or {}), sig=signature({"x": x}))


def _general(outputs: dict, items: list[WorkItem]) -> list[list]:
    return [encode_tensors(out)[0] for out in split_outputs(outputs, items)]


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(1, 4), min_size=2, max_size=12),
       shapes=st.lists(st.tuples(st.sampled_from(["float32", "int64", "bool", "float16", "uint8"]),
                                 st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=3))
def test_batch_outputs_are_what_encode_tensors_gives_each_request(rows, shapes):
    total = sum(rows)
    rng = np.random.default_rng(total)
    outputs = {f"o{k}": (rng.standard_normal((total, *tail)) * 10).astype(dt) for k, (dt, tail) in enumerate(shapes)}
    items = [_item(i, n) for i, n in enumerate(rows)]
    got = batch_outputs(outputs, rows)
    assert got is not None and got == _general(outputs, items)


def test_batch_outputs_leaves_the_general_path_what_it_must():
    rows = [1, 2]
    assert batch_outputs({"y": np.zeros((3, INLINE_MAX // 4 + 1), np.float32)}, rows) is None  # a frame each
    assert batch_outputs({"y": np.zeros((3, 4), ">f4")}, rows) is None  # big-endian: the codec converts it
    assert batch_outputs({"y": np.array([b"a", b"b", b"c"], dtype=object)}, rows) is None  # strings
    assert batch_outputs({"y": np.zeros((4, 2), np.float32)}, rows) is None  # rows that do not add up
    assert batch_outputs({"y": np.zeros((2, 3), np.float32).T}, rows) is None  # not C-contiguous
    assert batch_outputs({"y": torch.zeros(3, 2)}, rows) is None  # not numpy
    assert batch_outputs({"y": np.float32(1.0)}, rows) is None  # a scalar


_VALUES = st.one_of(st.integers(-2**40, 2**40), st.text(max_size=40), st.binary(max_size=300), st.none(),
                    st.booleans(), st.lists(st.integers(-100, 100), max_size=3))


@settings(max_examples=80, deadline=None)
@given(own=st.fixed_dictionaries({k: _VALUES for k in ("id", "key", "attempt", "outputs", "timing")}),
       shared=st.dictionaries(st.sampled_from(["ok", "model", "version", "batch_rows", "worker", "epoch"]), _VALUES))
def test_joined_header_is_the_whole_map_packed(own, shared):
    joined = joined_header(own, shared_fields(shared, len(own)))
    assert unpack_map(joined) == {**own, **shared}
    assert unpack_map(joined_header({"id": "x"}, shared_fields(shared, len(own)))) == {"id": "x", **shared}  # other count


@pytest.fixture
def compute():
    ctx = zmq.Context()
    model = ServedModel(parse_model_arg("mlp=ringserve.worker.demo:mlp"), torch.device("cpu"))
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    ep = "inproc://batch-replies"
    pull.bind(ep)
    ct = ComputeThread(ctx, ep, {"mlp": model}, Batcher(32))
    ct.worker_name, ct.epochs = "w1", {0: "e0", 1: "e1"}
    try:
        yield ct, model
    finally:
        pull.close(linger=0)
        ctx.term()


def test_packed_replies_match_the_general_path_field_for_field(compute, monkeypatch):
    ct, model = compute
    items = [_item(i, 1 + i % 3, link=i % 2, timing={"preprocess_ms": 0.5} if i == 3 else None) for i in range(9)]
    for i, item in enumerate(items):  # arrivals in runs (one REQUEST each), so timing maps are shared and not
        item.arrival = float(i // 4) / 1000.0
    fast = ct._compute(model, items, None)
    assert all(type(h) is bytes and len(frames) == 0 for h, frames in fast)
    monkeypatch.setattr("ringserve.worker.compute.batch_outputs", lambda outputs, rows, packed=False: None)
    slow = ct._compute(model, items, None)
    assert all(type(h) is dict for h, _ in slow)
    fast_queue = {}  # each arrival's queue_ms, the same for every answer that arrived then
    for (fh, _), item in zip(fast, items, strict=True):
        assert fast_queue.setdefault(item.arrival, unpack_map(fh)["timing"]["queue_ms"]) == \
            unpack_map(fh)["timing"]["queue_ms"]
    assert len(set(fast_queue.values())) == len(fast_queue)  # and a different one for each arrival
    for (fh, _), (sh, sframes), item in zip(fast, slow, items, strict=True):
        f, s = unpack_map(fh), unpack_map(pack(sh))
        f["timing"].pop("compute_ms"), s["timing"].pop("compute_ms")  # two runs of the model: two times
        f["timing"].pop("queue_ms"), s["timing"].pop("queue_ms")
        assert f == s and f["epoch"] == f"e{item.link}" and f["worker"] == "w1"
        assert decode_tensors(f["outputs"], [])["logits"].shape == (item.rows, 10)
    # what the socket thread receives: one RESULT whose replies split as the master splits them
    replies = split_replies(result_frames(0, fast)[1:])
    assert [unpack_map(raw)["key"] for raw, _, _ in replies] == [i.rid for i in items]


def test_a_signature_from_the_socket_thread_groups_as_the_batcher_would():
    """WorkItem.sig (computed once per checked input signature) gives the group key the batcher
    builds itself: requests that agree on names, dtypes and trailing shapes, in any input order,
    share a group; any difference parts them."""
    a = {"x": np.zeros((1, 4), np.float32), "m": np.zeros((1, 2), np.int64)}
    b = {"m": np.zeros((3, 2), np.int64), "x": np.zeros((3, 4), np.float32)}  # other order, other rows
    c = {"x": np.zeros((1, 4), np.float64), "m": np.zeros((1, 2), np.int64)}

    def key(inputs, sig):
        return WorkItem("k", 1, "m", None, inputs, 1, 0.0, 1.0, sig=signature(inputs) if sig else None).group_key()

    for sig in (False, True):
        assert key(a, sig) == key(b, sig) == key(a, not sig) and key(a, sig) != key(c, sig)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(1, 300), min_size=1, max_size=12),
       shapes=st.lists(st.tuples(st.sampled_from(["float32", "int64", "bool", "float16", "uint8"]),
                                 st.lists(st.integers(0, 5), max_size=2)), min_size=1, max_size=17))
def test_packed_batch_outputs_are_the_lists_encoded(rows, shapes):
    """batch_outputs(packed=True) (each request's list encoded once per row count, its bytes
    joined on) is, byte for byte, the list batch_outputs gives, encoded; None exactly when it is."""
    total = sum(rows)
    rng = np.random.default_rng(total)
    outputs = {f"o{k}": (rng.standard_normal((total, *tail)) * 10).astype(dt) for k, (dt, tail) in enumerate(shapes)}
    plain, packed = batch_outputs(outputs, rows), batch_outputs(outputs, rows, packed=True)
    assert (plain is None) == (packed is None)
    if plain is not None:
        assert [bytes(r) for r in packed] == [msgspec.msgpack.encode(m) for m in plain]
        assert [unpack(bytes(r)) for r in packed] == plain
