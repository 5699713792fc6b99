"""The worker's compiled REQUEST check (issue 22): parse_dispatch's fast path (envelope._fast_dispatch,
msgspec through protocol/fastcheck.py) only ever accepts, and where it accepts it gives the Python
path's Dispatch values, with each request's inputs already decoded as decode_tensors decodes them."""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringserve.protocol import envelope
from ringserve.protocol.codec import decode_tensors, encode_tensors, pack
from ringserve.protocol.envelope import (
    MAX_ID_LEN, dispatch_frames, dispatch_frames_packed, parse_dispatch, request_header, split_batch_checked,
)
from ringserve.protocol.messages import ProtocolError
from tests.test_proto8_fastcheck import ODD, request

pytestmark = pytest.mark.timeout(120)


@st.composite
def route(draw):
    """A REQUEST's routing fields [key, attempt, model, version, timeout_ms], mostly good."""
    fields = [draw(st.text(min_size=1, max_size=4)), draw(st.integers(1, 3)), draw(st.sampled_from(["m", "mlp"])),
              draw(st.none() | st.integers(0, 3)), draw(st.floats(0, 1e4) | st.integers(0, 1000))]
    if draw(st.integers(0, 3)) == 0:
        i = draw(st.integers(0, 4))
        fields[i] = draw(ODD | st.sampled_from(["", "k" * (MAX_ID_LEN + 1), "é" * MAX_ID_LEN, 0, 2**63, -1, math.nan,
                                                 math.inf, True, 1.0, "m" * 129]))
    return fields


def python_view(frames: list):
    try:
        return envelope._python_dispatch(frames)
    except ProtocolError as exc:
        return f"refused: {exc}"


def same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert repr((a.key, a.attempt, a.model, a.version, a.timeout_ms, a.header, a.error, a.cid)) == repr(
            (b.key, b.attempt, b.model, b.version, b.timeout_ms, b.header, b.error, b.cid))
        assert [bytes(f) for f in a.frames] == [bytes(f) for f in b.frames]
        assert a == b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(route(), request()), min_size=1, max_size=4),
       st.sampled_from(["packed", "packed", "packed", "framing1", "extra", "short", "seven", "not_bin"]))
def test_the_compiled_dispatch_accepts_only_what_python_accepts_with_the_same_values(reqs, form):
    entries = [(fields, raw, frames) for fields, (raw, frames) in reqs]
    frames = (dispatch_frames if form == "framing1" else dispatch_frames_packed)(entries)
    if form == "extra":
        frames.append(b"\0" * 4)
    elif form == "short" and len(frames) > 1:
        frames.pop()
    elif form in ("seven", "not_bin"):
        rows = msgpack.unpackb(frames[0], strict_map_key=False)
        rows[0] = [*rows[0], 1] if form == "seven" else [*rows[0][:5], "header"]
        frames[0] = pack(rows)
    want = python_view(frames)
    fast = envelope._fast_dispatch(frames)
    if fast is None:
        got = python_view(frames)
        assert repr(got) == repr(want)
        return
    assert not isinstance(want, str) and all(d.error is None for d in want)  # it accepts only what Python accepts
    same(fast, want)
    for d in fast:  # the inputs as the worker would have decoded them from the header
        arrays = decode_tensors(d.header.get("inputs"), d.frames)
        assert list(d.arrays) == list(arrays)
        for name, a in arrays.items():
            b = d.arrays[name]
            assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes())
    assert parse_dispatch(frames) == fast


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route(), request())
def test_the_worker_and_the_masters_compiled_check_give_one_verdict(fields, req):
    """One request: the master's split_batch_checked accepts it through msgspec exactly when the
    worker's compiled dispatch does (its routing fields being good)."""
    raw, frames = req
    fields = ["k", 1, "m", None, 1000.0]
    got, broken = split_batch_checked([pack([["m", raw]]), *frames])
    master_fast = broken is None and got[0][4] is not None
    fast = envelope._fast_dispatch(dispatch_frames_packed([(fields, raw, frames)]))
    assert (fast is not None) == master_fast
    if fast is not None:
        assert fast[0].cid == got[0][4].rid and len(fast[0].frames) == len(got[0][3])


def test_the_workers_own_form_takes_the_compiled_path():
    x = np.arange(256, dtype=np.float32).reshape(1, 256)
    big = np.zeros((64, 1024), dtype=np.float32)  # out of line
    meta, data = encode_tensors({"x": x, "big": big})
    raw = pack(request_header("c1", meta, timeout_ms=500))
    frames = dispatch_frames_packed([(["k1", 1, "mlp", None, 500.0], raw, data)])
    (d,) = parse_dispatch(frames)
    assert d.arrays is not None and d.raw == raw and d.cid == "c1" and d.error is None
    assert np.array_equal(d.arrays["x"], x) and np.array_equal(d.arrays["big"], big)
    assert d.header["id"] == "c1"  # unpacked when asked
    # one bad entry: the whole REQUEST goes the Python way, which answers each entry by its key
    bad = dispatch_frames_packed([(["k1", 1, "mlp", None, 500.0], raw, data),
                                  (["k2", 1, "mlp", None, math.nan], raw, data)])
    assert envelope._fast_dispatch(bad) is None
    a, b = parse_dispatch(bad)
    assert a.error is None and a.arrays is None and "timeout_ms" in b.error
