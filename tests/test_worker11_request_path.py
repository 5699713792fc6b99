"""Issue 22 (ninth round): the worker's no-op request path without an object per request per stage.

`envelope.fast_requests` (plain rows for the compiled path, no Dispatch each) and
`Batcher.add_all` (one group lookup per run of requests that share model and signature) must
give what the per-request path gives: the same rows as `_fast_dispatch`, the same queues, rows
and soonest deadlines as `add` one by one, and, in a REQUEST the compiled checks take, each bad
request answered BAD_REQUEST by its own key while its neighbours go on to the compute thread."""
from __future__ import annotations

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from ringserve.protocol import envelope
from ringserve.protocol.codec import encode_tensors, pack, unpack, unpack_map
from ringserve.protocol.envelope import dispatch_frames_packed, request_header
from ringserve.protocol.messages import REPLY, WORKER_PROTO
from ringserve.worker.batching import Batcher, ModelBatching, Ragged, WorkItem, signature

from helpers import noop_agent_and_master

pytestmark = pytest.mark.timeout(120)

_SIGS = [signature({"x": np.zeros((1, 4), np.float32)}), signature({"x": np.zeros((1, 8), np.float32)}), None]


@st.composite
def _items(draw):
    out = []
    for i in range(draw(st.integers(0, 40))):
        model = draw(st.sampled_from(["a", "b", "rag"]))
        sig = draw(st.sampled_from(_SIGS))
        rows = draw(st.integers(1, 3))
        x = np.zeros((rows, 4 if sig is _SIGS[0] else 8), np.float32)
        if model == "rag":
            x = np.zeros((rows, draw(st.integers(1, 6))), np.int64)
            sig = None
        item = WorkItem(f"k{i}", 1, model, draw(st.sampled_from([None, None, 3])), {"x": x}, rows,
                        arrival=float(i), deadline=draw(st.floats(0.0, 100.0)), sig=sig)
        if draw(st.integers(0, 9)) == 0:
            item.stage_version = 2
        out.append(item)
    return out


def _batcher() -> Batcher:
    b = Batcher(8)
    b.configure({"rag": ModelBatching(ragged=Ragged({"x": 0}))})
    return b


def _state(b: Batcher) -> tuple:
    return ({k: [i.rid for i in g] for k, g in b.groups.items()}, dict(b.rows), dict(b.soonest))


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(_items(), max_size=4))
def test_add_all_is_add_one_by_one(chunks):
    one, whole = _batcher(), _batcher()
    for chunk in chunks:
        for item in chunk:
            one.add(item)
        whole.add_all(chunk)
    assert _state(one) == _state(whole)


def test_fast_requests_are_the_compiled_dispatch_as_rows():
    x = np.arange(256, dtype=np.float32).reshape(1, 256)
    big = np.zeros((64, 1024), dtype=np.float32)  # out of line: a frame of its own
    meta, data = encode_tensors({"x": x, "big": big})
    entries = [([f"k{i}", 1 + i, "mlp", None if i else 4, 500.0], pack(request_header(f"c{i}", meta, timeout_ms=500)),
                data) for i in range(3)]
    frames = dispatch_frames_packed(entries)
    rows, ds = envelope.fast_requests(frames), envelope._fast_dispatch(frames)
    assert len(rows) == len(ds) == 3
    for (key, attempt, model, version, timeout_ms, cid, fr, arrays, raw), d in zip(rows, ds, strict=True):
        assert (key, attempt, model, version, timeout_ms, cid, raw) == \
            (d.key, d.attempt, d.model, d.version, d.timeout_ms, d.cid, d.raw)
        assert fr == d.frames and len(fr) == 1 and np.array_equal(arrays["x"], x)
    assert envelope.fast_requests([]) is None
    assert envelope.fast_requests(frames[:-1]) is None  # a frame short: the Python path words it


@pytest.fixture
def agent_and_master():
    with noop_agent_and_master() as pair:
        yield pair


def test_a_bad_request_in_a_compiled_request_is_answered_alone(agent_and_master):
    agent, router = agent_and_master
    good, _ = encode_tensors({"x": np.ones((1, 4), np.float32)})
    wrong, _ = encode_tensors({"x": np.ones((1, 4), np.float64)})  # noop takes float32
    entries = [(["k0", 1, "noop", None, 500.0], pack(request_header("c0", good, timeout_ms=500)), []),
               (["k1", 2, "nope", None, 500.0], pack(request_header("c1", good, timeout_ms=500)), []),
               (["k2", 1, "noop", None, 500.0], pack(request_header("c2", wrong, timeout_ms=500)), []),
               (["k3", 1, "noop", None, 0.0], pack(request_header("c3", good, timeout_ms=500)), [])]
    frames = dispatch_frames_packed(entries)
    assert envelope.fast_requests(frames) is not None  # the compiled path takes it whole
    agent.on_requests([zmq.Frame(f) for f in frames], agent.links[0])
    items = agent.compute.inbox.get_nowait()
    assert [i.rid for i in items] == ["k0", "k3"] and [i.cid for i in items] == ["c0", "c3"]
    assert items[1].deadline == items[1].arrival  # timeout 0: due at once (TIMEOUT without compute)
    assert agent.in_flight == agent.links[0].in_flight == 2
    assert router.poll(10_000)
    msg = router.recv_multipart()
    assert msg[1] == WORKER_PROTO and msg[2] == REPLY
    answers = [unpack_map(h) for h in msg[3:]]
    assert [(a["key"], a["id"], a["attempt"], a["error"]["code"]) for a in answers] == \
        [("k1", "c1", 2, "BAD_REQUEST"), ("k2", "c2", 1, "BAD_REQUEST")]
    assert "does not serve model 'nope'" in answers[0]["error"]["message"]
    assert "dtype float64, expected float32" in answers[1]["error"]["message"]
    assert unpack(msg[3])["key"] == "k1"
