"""One fact, one check: the master (reading a client's message) and the worker (splitting the
master's coalesced REQUEST) must agree on every request's frames, id and verdict. Hypothesis feeds
both the same random requests (valid, mutated, coalesced) and compares what each concluded."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringserve.protocol import codec
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.envelope import (
    MAX_ID_LEN, dispatch_frames, parse_dispatch, parse_request_header, request_frames,
)
from ringserve.protocol.messages import ProtocolError

pytestmark = pytest.mark.timeout(120)

DTYPES = ["float32", "int64", "uint8", "bool", "float16"]
ITEM = {"float32": 4, "int64": 8, "uint8": 1, "bool": 1, "float16": 2}


@st.composite
def tensor(draw):
    """(meta entry, its out-of-line frame or None): mostly valid, sometimes mutated."""
    name = draw(st.sampled_from(["x", "y", "ids", "mask"]) | st.text(max_size=3))
    dtype = draw(st.sampled_from(DTYPES) | st.sampled_from(["complex64", "", 3, None, ["float32"]]))
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3) | st.sampled_from([[-1], "2", [2**40], None]))
    size = 1
    for d in shape if isinstance(shape, list) else []:
        size *= d if isinstance(d, int) and d >= 0 else 1
    good = size * ITEM.get(dtype, 1) if isinstance(dtype, str) else 1
    nbytes = draw(st.sampled_from([good, good, good, max(0, good - 1), good + 1]))
    data = b"\0" * min(nbytes, 1 << 12)
    how = draw(st.sampled_from(["frame", "frame", "inline", "inline", "nil", "int", "str", "five"]))
    if how == "frame":
        return [name, dtype, shape], data
    if how == "inline":
        return [name, dtype, shape, data], None
    odd = {"nil": None, "int": 7, "str": "abc"}.get(how)
    return ([name, dtype, shape, odd], None) if how != "five" else ([name, dtype, shape, data, 1], None)


def strings_buffer(items: list[bytes]) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


@st.composite
def bytes_tensor(draw):
    """A string tensor entry (4-byte little-endian lengths, then the bytes), valid or mutated:
    the count, the lengths, the buffer's end, and where its data travels."""
    name = draw(st.sampled_from(["text", "s"]))
    items = draw(st.lists(st.binary(max_size=6), max_size=5))
    shape = draw(st.sampled_from([[len(items)], [1, len(items)], [len(items), 1]]))
    data = strings_buffer(items)
    mutation = draw(st.sampled_from(["none"] * 5 + ["count_up", "count_down", "cut", "extra", "huge_len", "short_len",
                                                     "no_prefix"]))
    if mutation == "count_up":
        shape = [len(items) + 1]
    elif mutation == "count_down" and items:
        shape = [len(items) - 1]
    elif mutation == "cut" and data:
        data = data[:-1]
    elif mutation == "extra":
        data += b"\0"
    elif mutation == "huge_len" and items:
        data = (2**32 - 1).to_bytes(4, "little") + data[4:]
    elif mutation == "short_len" and items and items[0]:
        data = (len(items[0]) - 1).to_bytes(4, "little") + data[4:]
    elif mutation == "no_prefix":
        data = b"".join(items)
    if draw(st.booleans()):
        return [name, "bytes", shape], data
    return [name, "bytes", shape, data], None


@st.composite
def client_request(draw):
    """(header frame bytes, tensor frames) as a client might send them, good or bad."""
    tensors = draw(st.lists(tensor() | bytes_tensor(), max_size=4))
    meta = [t[0] for t in tensors]
    frames = [t[1] for t in tensors if t[1] is not None]
    rid = draw(st.text(min_size=1, max_size=8) | st.sampled_from(["", "r" * MAX_ID_LEN, "r" * (MAX_ID_LEN + 1), 5]))
    header = {"id": rid, "inputs": meta}
    mutation = draw(st.sampled_from(["none"] * 6 + ["no_inputs", "inputs_map", "extra_frame", "drop_frame",
                                                     "version", "not_map", "garbage"]))
    if mutation == "no_inputs":
        del header["inputs"]
    elif mutation == "inputs_map":
        header["inputs"] = {"x": 1}
    elif mutation == "extra_frame":
        frames.append(b"\0" * 4)
    elif mutation == "drop_frame" and frames:
        frames.pop()
    elif mutation == "version":
        header["version"] = draw(st.sampled_from([-1, "1", True, 2]))
    raw = pack(header)
    if mutation == "not_map":
        raw = pack([header])
    elif mutation == "garbage":
        raw = b"\xc1" + raw
    return raw, frames


def master_verdict(raw: bytes, frames: list) -> tuple:
    """What the master concludes (broker._on_client's checks): ("ok", id, frame count) or ("bad",)."""
    try:
        parsed = parse_request_header(unpack_map(raw), frames)
    except ProtocolError:
        return ("bad",)
    return ("ok", parsed.rid, len(frames))


def worker_view(requests: list[tuple[bytes, list]]) -> list:
    """What the worker concludes from one REQUEST carrying `requests`, by key."""
    entries = [([f"k{i}", 1, "m", None, 1000.0], raw, frames) for i, (raw, frames) in enumerate(requests)]
    got = {d.key: d for d in parse_dispatch(dispatch_frames(entries))}
    assert set(got) == {f"k{i}" for i in range(len(requests))}  # every entry is answered by its key
    return [got[f"k{i}"] for i in range(len(requests))]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client_request())
def test_one_request_gets_one_verdict_from_both(req):
    raw, frames = req
    verdict = master_verdict(raw, frames)
    (d,) = worker_view([req])
    if verdict[0] == "ok":
        assert d.error is None, d.error
        assert (d.cid, len(d.frames)) == verdict[1:]
        assert request_frames(unpack_map(raw)) == len(frames)
    else:
        assert d.error is not None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(client_request(), min_size=1, max_size=6))
def test_coalesced_requests_split_exactly_as_the_master_counted_them(reqs):
    accepted = [r for r in reqs if master_verdict(*r)[0] == "ok"]
    if accepted:  # what a master really sends: only requests it accepted, side by side
        for (raw, frames), d in zip(accepted, worker_view(accepted), strict=True):
            assert d.error is None, d.error
            assert d.cid == unpack_map(raw)["id"] and [bytes(f) for f in d.frames] == [bytes(f) for f in frames]
    # A mix (a buggy or hostile master): never raises, every entry answered, and whatever the worker
    # accepts is what the master would accept with the same frames. (Frames that do not add up cannot
    # be pinned on one request: an extra frame of a rejected request reads as its neighbour's header,
    # and frames left over at the end fail every entry, so a mix is not split request by request.)
    view = worker_view(reqs)
    for d in view:  # judged on the header the worker read: after a miscount it is a later request's
        if d.error is None:
            assert master_verdict(pack(d.header), d.frames) == ("ok", d.cid, len(d.frames))
    if all(d.error is None for d in view):
        for r, d in zip(reqs, view, strict=True):
            assert master_verdict(*r) == ("ok", d.cid, len(d.frames))


def test_nil_data_is_refused_by_both():
    raw = pack({"id": "r", "inputs": [["x", "float32", [1], None]]})
    assert master_verdict(raw, [b"\0" * 4]) == ("bad",)
    assert master_verdict(raw, []) == ("bad",)
    (d,) = worker_view([(raw, [b"\0" * 4])])
    assert d.error is not None
    good = pack({"id": "g", "inputs": [["x", "float32", [1], b"\0" * 4]]})
    first, second = worker_view([(good, []), (raw, [])])
    assert first.error is None and second.error is not None  # its neighbour is untouched


def test_request_frames_is_the_rule_both_use():
    assert request_frames({"inputs": [["a", "float32", [1]], ["b", "float32", [1], b"1234"]]}) == 1
    assert request_frames({"inputs": {"a": 1}}) == -1 and request_frames([1]) == -1
    assert request_frames(msgpack.unpackb(pack({"inputs": []}))) == 0


def test_a_string_tensor_counts_frames_by_the_same_rule():
    inline = ["t", "bytes", [2], strings_buffer([b"a", b""])]
    assert request_frames({"inputs": [inline, ["u", "bytes", [1]]]}) == 1
    raw = pack({"id": "s", "inputs": [inline, ["u", "bytes", [1]]]})
    assert master_verdict(raw, [strings_buffer([b"\xff" * 70000])]) == ("ok", "s", 1)
    (d,) = worker_view([(raw, [strings_buffer([b"\xff" * 70000])])])
    assert d.error is None
    assert master_verdict(raw, [strings_buffer([b"x", b"y"])]) == ("bad",)  # two strings, shape says one


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client_request())
def test_the_fast_tensor_walk_never_accepts_what_the_full_walk_refuses(req):
    """codec._fast_walk (the common case, every role's hot path) must give the full walk's answer or
    step aside (None): never accept a tensor list the full walk refuses, never other arrays."""
    raw, frames = req
    try:
        header = unpack_map(raw)
    except ProtocolError:
        return
    meta = header.get("inputs")
    try:
        full = codec._walk(meta, frames, make=True)
    except ProtocolError:
        full = None
    for make in (True, False):
        fast = codec._fast_walk(meta, frames, make)
        if fast is None:
            continue
        assert full is not None, "the fast walk accepted what the full walk refuses"
        assert list(fast) == (list(full) if make else [])
        for name, arr in fast.items():
            assert (arr.dtype, arr.shape, arr.tobytes()) == (full[name].dtype, full[name].shape, full[name].tobytes())
