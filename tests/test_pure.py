"""The pure parts, tested without sockets: codec, policies, liveness, batching."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from ringserve.master import liveness
from ringserve.master.scheduler import Load, make_policy
from ringserve.protocol.codec import check_tensors, decode_tensors, encode_tensors, frame_count, pack, unpack_map
from ringserve.protocol.envelope import parse_request_header
from ringserve.protocol.messages import ProtocolError
from ringserve.worker.batching import Batcher, WorkItem, concat_inputs, split_outputs


def test_codec_roundtrip_is_zero_copy():
    arrs = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([True, False]),
            "c": np.zeros((0, 5), np.int64)}
    meta, frames = encode_tensors(arrs, inline_max=0)
    frames = [bytes(f) for f in frames]
    out = decode_tensors(unpack_map(pack({"m": meta}))["m"], frames)
    for k in arrs:
        np.testing.assert_array_equal(out[k], arrs[k])
        assert out[k].dtype == arrs[k].dtype
    assert np.shares_memory(out["a"], np.frombuffer(frames[0], np.uint8))


def test_small_tensors_travel_inline_large_ones_in_frames():
    arrs = {"small": np.arange(6, dtype=np.int64).reshape(2, 3), "big": np.ones((64, 1024), np.float32),
            "empty": np.zeros((0, 4), np.float16)}
    meta, frames = encode_tensors(arrs)
    assert [len(e) for e in meta] == [4, 3, 4] and len(frames) == 1 and frame_count(meta) == 1
    wire = unpack_map(pack({"m": meta}))["m"]
    check_tensors(wire, frames)
    out = decode_tensors(wire, frames)
    for k in arrs:
        np.testing.assert_array_equal(out[k], arrs[k])
    with pytest.raises(ProtocolError, match="needs 48"):
        decode_tensors([["x", "int64", [2, 3], b"\0" * 47]], [])
    with pytest.raises(ProtocolError, match="bin"):
        check_tensors([["x", "int64", [1], "eightchr"]], [])


@pytest.mark.parametrize("meta,frames,msg", [
    ([["x", "float32", [2, 2]]], [b"\0" * 15], "needs 16"),
    ([["x", "complex64", [1]]], [b"\0" * 8], "unsupported dtype"),
    ([["x", "float32", [-1]]], [b""], "non-negative"),
    ([["x", "float32", [1]]], [], "1 tensors out of line but 0"),
    ([["x", "float32", [1], b"\0" * 4]], [b"\0" * 4], "0 tensors out of line but 1"),
    ("nope", [], "array"),
    ([["x", "float32", [1]], ["x", "float32", [1]]], [b"\0" * 4] * 2, "twice"),
])
def test_codec_rejects_bad_tensors(meta, frames, msg):
    with pytest.raises(ProtocolError, match=msg):
        decode_tensors(meta, frames)


def test_a_request_message_splits_per_request_and_answers_bad_entries_by_id():
    from ringserve.protocol.envelope import dispatch_frames, parse_dispatch

    big = np.ones((64, 1024), np.float32)
    good = pack({"id": "c1", "inputs": [["x", "float32", [64, 1024]]]})
    small = pack({"id": "c2", "inputs": [["x", "int64", [1], b"\0" * 8]]})
    frames = dispatch_frames([(["a", 1, "m", None, 100.0], good, [memoryview(big).cast("B")]),
                              (["b", "x", "m", None, 100.0], small, []),  # a bad attempt: answered by id
                              ([7, 1, "m", None, 100.0], small, []),  # no usable id: nobody to answer
                              (["d", 2, "m", 3, 5.0], b"\xc1", [])])  # a header that is not msgpack
    got = parse_dispatch([bytes(f) for f in frames])
    assert [(d.key, d.error is None) for d in got] == [("a", True), ("b", False), ("d", False)]
    assert got[0].header["id"] == "c1" and got[0].cid == "c1" and len(got[0].frames) == 1
    assert "attempt" in got[1].error and "could not split" in got[2].error
    # Frames that do not add up: every entry is answered by its key (none is trusted), nothing raises.
    clean = dispatch_frames([(["a", 1, "m", None, 100.0], good, [memoryview(big).cast("B")]),
                             (["b", 1, "m", None, 100.0], small, [])])
    extra = parse_dispatch([*clean, b"extra"])
    assert [d.key for d in extra] == ["a", "b"] and all("no request accounts for" in d.error for d in extra)
    short = parse_dispatch(frames[:3])  # a's header and frame, then nothing
    assert [(d.key, d.error is None) for d in short] == [("a", True), ("b", False), ("d", False)]
    assert "more requests than it carries" in short[1].error
    with pytest.raises(ProtocolError, match="dispatch"):
        parse_dispatch([pack({"not": "a list"}), good])


def test_bad_msgpack_and_missing_fields():
    with pytest.raises(ProtocolError, match="msgpack"):
        unpack_map(b"\xc1\xc1")
    with pytest.raises(ProtocolError, match="'inputs'"):
        parse_request_header({"id": "1"}, [])
    with pytest.raises(ProtocolError, match="'id'"):
        parse_request_header({"inputs": []}, [])
    with pytest.raises(ProtocolError, match="timeout_ms"):
        parse_request_header({"id": "1", "inputs": [], "timeout_ms": -1}, [])


def loads(*outstanding, credit=10, weights=None):
    return [Load(f"w{i}".encode(), o, credit, (weights or [1] * len(outstanding))[i])
            for i, o in enumerate(outstanding)]


def test_least_outstanding_prefers_idle():
    choose = make_policy("least-outstanding", seed=1)
    for _ in range(50):
        assert choose(loads(3, 0, 5)) == b"w1"


def test_round_robin_exact():
    choose = make_policy("round-robin")
    counts = Counter(choose(loads(0, 0, 0)) for _ in range(999))
    assert counts == {b"w0": 333, b"w1": 333, b"w2": 333}


def test_weighted_random_matches_weights():
    choose = make_policy("weighted-random", seed=3)
    counts = Counter(choose(loads(0, 0, 0, weights=[1, 2, 5])) for _ in range(8000))
    for key, w in ((b"w0", 1), (b"w1", 2), (b"w2", 5)):
        assert abs(counts[key] / 8000 - w / 8) < 0.03


def test_power_of_two_avoids_the_busiest():
    choose = make_policy("power-of-two", seed=4)
    counts = Counter(choose(loads(0, 0, 9)) for _ in range(600))
    assert counts[b"w2"] == 0


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")


def test_liveness_missed():
    seen = {"a": 10.0, "b": 7.0, "c": 9.5}
    assert liveness.missed(seen, now=10.0, interval_s=1.0, liveness=2) == {"b"}
    assert liveness.expiry(0.5, 3) == 1.5


def item(rid, rows, arrival, model="m", trailing=(4,), deadline=99.0):
    return WorkItem(rid, 1, model, None, {"x": np.full((rows, *trailing), float(rid[-1]), np.float32)},
                    rows, arrival, deadline)


def test_batcher_waits_then_batches_up_to_max():
    b = Batcher(max_batch_size=4, max_queue_delay_s=0.01)
    b.add(item("r1", 1, arrival=0.0))
    batch, wait = b.next_batch(now=0.004)
    assert batch == [] and wait == pytest.approx(0.006)
    for i in range(2, 7):
        b.add(item(f"r{i}", 1, arrival=0.005))
    batch, _ = b.next_batch(now=0.005)  # full: no need to wait
    assert [i.rid for i in batch] == ["r1", "r2", "r3", "r4"]
    batch, wait = b.next_batch(now=0.006)
    assert batch == [] and wait == pytest.approx(0.009)
    batch, _ = b.next_batch(now=0.02)
    assert [i.rid for i in batch] == ["r5", "r6"]


def test_batcher_runs_a_group_that_stopped_growing_before_the_delay():
    """With an idle gap, a group that received nothing new for that long runs at once; one that
    keeps growing waits up to the whole delay (or until it is full)."""
    b = Batcher(max_batch_size=8, max_queue_delay_s=0.01, idle_gap_s=0.002)
    b.add(item("a1", 1, 0.0))
    assert b.next_batch(0.001) == ([], pytest.approx(0.001))
    b.add(item("b2", 1, 0.0015))
    assert b.next_batch(0.003) == ([], pytest.approx(0.0005))  # the newest arrived 1.5 ms ago
    batch, _ = b.next_batch(0.0036)
    assert [i.rid for i in batch] == ["a1", "b2"]
    for k in range(6):  # a steady stream: never quiet for 2 ms, so the 10 ms delay decides
        b.add(item(f"s{k}", 1, 0.02 + 0.0015 * k))
    assert b.next_batch(0.0290)[0] == []
    assert len(b.next_batch(0.0301)[0]) == 6
    assert Batcher(8, 0.0, idle_gap_s=0.5).idle_gap_s == 0.0  # never beyond the delay


def test_batcher_never_mixes_trailing_shapes_and_drops_expired():
    b = Batcher(max_batch_size=8, max_queue_delay_s=0.0)
    b.add(item("a1", 2, 0.0, trailing=(4,)))
    b.add(item("b2", 1, 0.0, trailing=(5,)))
    b.add(item("a3", 1, 0.0, trailing=(4,)))
    b.add(item("x4", 1, 0.0, deadline=0.5))
    assert [i.rid for i in b.take_expired(now=1.0)] == ["x4"]
    first, _ = b.next_batch(1.0)
    second, _ = b.next_batch(1.0)
    assert {tuple(i.rid for i in first), tuple(i.rid for i in second)} == {("a1", "a3"), ("b2",)}


def test_concat_and_split_roundtrip():
    items = [item("r1", 1, 0), item("r2", 3, 0), item("r3", 2, 0)]
    batched = concat_inputs(items)
    assert batched["x"].shape == (6, 4)
    parts = split_outputs({"y": batched["x"] * 2}, items)
    for it, part in zip(items, parts):
        np.testing.assert_array_equal(part["y"], it.inputs["x"] * 2)
    with pytest.raises(ValueError, match="rows along dim 0"):
        split_outputs({"y": np.zeros((5, 1))}, items)


def test_random_policy_uses_all():
    choose = make_policy("random", seed=random.randint(0, 1000))
    assert set(choose(loads(0, 0, 0)) for _ in range(200)) == {b"w0", b"w1", b"w2"}


def test_a_shard_bound_to_every_address_is_subscribed_to_where_it_was_reached():
    from ringserve.worker.sync import reachable_pub

    assert reachable_pub("tcp://0.0.0.0:5601", "tcp://10.77.0.4:5600") == "tcp://10.77.0.4:5601"
    assert reachable_pub("tcp://*:5601", "tcp://ps-0.ps:5600") == "tcp://ps-0.ps:5601"
    assert reachable_pub("tcp://10.0.0.9:5601", "tcp://10.77.0.4:5600") == "tcp://10.0.0.9:5601"
    assert reachable_pub("ipc:///tmp/x", "tcp://h:1") == "ipc:///tmp/x"


def test_a_map_packed_from_its_pairs_is_the_map():
    """codec.pack_map_with (a cached answer's header, packed once, with each hit's id added)."""
    from ringserve.protocol.codec import pack_map_with, pack_pairs
    for header in ({}, {"ok": True, "outputs": [["y", "float32", [1], b"\0" * 4]], "version": 3},
                   {f"k{i}": i for i in range(20)}):  # beyond a fixmap's 15 entries
        count, pairs = pack_pairs(header)
        assert unpack_map(pack_map_with(count, pairs, "id", "r-1")) == {"id": "r-1", **header}


def test_master_metrics_counted_locally_read_like_prometheus_series():
    """The master's per-request series are counted in dicts and made into families on scrape: a value
    on a bucket's bound counts in that bucket (le), +Inf holds them all, versions read as strings."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from ringserve.master.metrics import MasterMetrics
    m = MasterMetrics("least-outstanding")
    for seconds in (0.0005, 0.003, 50.0):
        m.on_answer("mlp", 2, "ok", seconds)
    m.on_answer("mlp", None, "TIMEOUT", 0.2)
    m.on_dispatch("mlp", 0.0001)
    m.on_cache("mlp", False)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(generate_latest(m.registry).decode()) for s in fam.samples}
    assert samples[("ringserve_requests_total", (("model", "mlp"), ("outcome", "ok"), ("version", "2")))] == 3
    assert samples[("ringserve_requests_total", (("model", "mlp"), ("outcome", "TIMEOUT"), ("version", "")))] == 1
    assert samples[("ringserve_request_duration_seconds_bucket", (("le", "0.0005"), ("model", "mlp")))] == 1
    assert samples[("ringserve_request_duration_seconds_bucket", (("le", "0.005"), ("model", "mlp")))] == 2
    assert samples[("ringserve_request_duration_seconds_bucket", (("le", "30.0"), ("model", "mlp")))] == 3
    assert samples[("ringserve_request_duration_seconds_bucket", (("le", "+Inf"), ("model", "mlp")))] == 4
    assert samples[("ringserve_request_duration_seconds_count", (("model", "mlp"),))] == 4
    assert samples[("ringserve_queue_duration_seconds_count", (("model", "mlp"),))] == 1
    assert samples[("ringserve_response_cache_lookups_total", (("model", "mlp"), ("result", "miss")))] == 1


def test_a_message_counted_at_once_reads_like_each_answer_counted_alone():
    """MasterMetrics.on_answers / on_dispatches (a REPLY's results, a dispatched run) count what
    on_answer / on_dispatch would for each of them."""
    from ringserve.master.metrics import MasterMetrics
    seconds = [0.0005, 0.003, 0.2, 50.0]
    one, many = MasterMetrics("least-outstanding"), MasterMetrics("least-outstanding")
    for s in seconds:
        one.on_answer("mlp", 2, "ok", s)
        one.on_dispatch("mlp", s)
    many.on_answers("mlp", 2, "ok", seconds)
    many.on_dispatches("mlp", seconds)
    assert one.local.answers == many.local.answers
    for series in ("request_duration", "queue_duration"):
        a, b = getattr(one.local, series)["mlp"], getattr(many.local, series)["mlp"]
        assert a.counts == b.counts and a.sum == pytest.approx(b.sum)


def test_a_run_popped_from_a_queue_is_its_oldest_in_order():
    """ModelQueues.pop_front (dispatch's run for one free worker): the FIFO's head first, re-queued
    requests before all others, at most n, and the books of an emptied FIFO dropped."""
    import time

    from ringserve.master.registry import ModelQueues, PendingRequest

    def req(key, version=None):
        return PendingRequest(key, key, b"c", b"m", "m", version, b"", [], time.monotonic() + 30, time.monotonic())
    q = ModelQueues(max_queue=100)
    reqs = [req(f"k{i}") for i in range(5)]
    for r in reqs:
        q.push(r)
    back = req("back")
    q.push(back, front=True)
    q.push(req("pinned", 3))
    assert [r.key for r in q.pop_front("m", None, 3)] == ["back", "k0", "k1"]
    assert q.depth("m") == 4 and q.pop_front("m", None, 0) == [] and q.pop_front("nope", None, 5) == []
    assert [r.key for r in q.pop_front("m", None, 10)] == ["k2", "k3", "k4"]
    assert [pin for pin, _ in q.heads("m")] == [3]
    assert [r.key for r in q.pop_front("m", 3, 10)] == ["pinned"] and q.models() == [] and q.depth("m") == 0
