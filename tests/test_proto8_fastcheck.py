"""The compiled accept paths (protocol/fastcheck.py: msgspec) against the Python checks they stand in for.

They may only ever accept, and only what Python accepts, with the same values: hypothesis feeds both
the same random headers (valid, mutated, wrong types, bool for int, NaN and inf, huge ints, extra
fields, bin keys, int keys, ext types, duplicate keys, wrong lengths, truncated bytes) and compares."""
from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringserve.protocol import fastcheck
from ringserve.protocol.codec import pack, unpack, unpack_map
from ringserve.protocol.envelope import (
    MAX_ID_LEN, REPLY_FIELDS, _reply_frame_count, checked_result, packed_reply_frames, parse_request_header,
    request_frames, split_batch_checked, split_batch_packed, split_replies, split_results,
)
from ringserve.protocol.messages import ProtocolError

pytestmark = pytest.mark.timeout(120)

ITEM = {"float32": 4, "int64": 8, "uint8": 1, "bool": 1, "float16": 2, "float64": 8}
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.binary(max_size=4), st.lists(st.integers(-2, 3), max_size=2),
    st.dictionaries(st.integers(0, 3), st.integers(0, 3), max_size=1), st.dictionaries(st.text(max_size=2), st.booleans(), max_size=2),
    st.just(msgpack.ExtType(5, b"x")), st.just(msgpack.Timestamp(1, 0)),
)


@st.composite
def tensor(draw):
    """(meta entry, its out-of-line frame or None): three in four valid, the rest with something odd."""
    if draw(st.integers(0, 3)):
        name, dtype = draw(st.sampled_from(["x", "y", "ids"]) | st.text(min_size=1, max_size=3)), draw(st.sampled_from(sorted(ITEM)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        data = b"\0" * (math.prod(shape) * ITEM[dtype])
        return ([name, dtype, shape], data) if draw(st.booleans()) else ([name, dtype, shape, data], None)
    name = draw(st.sampled_from(["x", "y", "ids", "é" * 128, "n" * 129]) | st.text(max_size=3))
    dtype = draw(st.sampled_from(sorted(ITEM)) | st.sampled_from(["bytes", "complex64", ""]) | ODD)
    shape = draw(st.lists(st.integers(0, 4), max_size=3) | st.lists(st.integers(0, 3), min_size=9, max_size=9)
                 | st.sampled_from([[-1], [True], [2.0], [2**31], [2**31 - 1, 0], [2**20, 2**20, 2], "2", None]) | ODD)
    size = 1
    for d in shape if isinstance(shape, list) else []:
        size *= d if type(d) is int and 0 <= d < 100 else 1
    good = size * ITEM.get(dtype, 1) if isinstance(dtype, str) else 1
    data = b"\0" * draw(st.sampled_from([good, good, good, max(0, good - 1), good + 1]))
    how = draw(st.sampled_from(["frame", "frame", "inline", "inline", "odd", "five", "two"]))
    if how == "frame":
        return [name, dtype, shape], data
    if how == "inline":
        return [name, dtype, shape, data], None
    if how == "odd":
        return [name, dtype, shape, draw(ODD)], None
    return ([name, dtype, shape, data, 1], None) if how == "five" else ([name, dtype], None)


def raw_map(pairs: list) -> bytes:
    """A msgpack map from (key, value) pairs as given: duplicate keys and any key type kept."""
    n = len(pairs)
    head = bytes([0x80 | n]) if n <= 15 else b"\xde" + n.to_bytes(2, "big")
    return head + b"".join(msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True) for k, v in pairs)


def mutate(draw, pairs: list, fields: list) -> bytes:
    """Some of the many ways a peer's header can be wrong, applied to its (key, value) pairs."""
    m = draw(st.sampled_from(["none"] * 16 + ["drop", "odd_value", "extra", "bin_key", "int_key", "dup", "not_map",
                                              "truncate", "trailing", "garbage"]))
    if m == "drop" and pairs:
        pairs.pop(draw(st.integers(0, len(pairs) - 1)))
    elif m == "odd_value" and pairs:
        i = draw(st.integers(0, len(pairs) - 1))
        pairs[i] = (pairs[i][0], draw(ODD))
    elif m == "extra":
        pairs.append((draw(st.sampled_from(["x", "meta", "idd"]) | st.sampled_from(fields)), draw(ODD)))
    elif m == "bin_key" and pairs:
        i = draw(st.integers(0, len(pairs) - 1))
        pairs[i] = (pairs[i][0].encode(), pairs[i][1])
    elif m == "int_key":
        pairs.append((draw(st.integers(0, 3)), 1))
    elif m == "dup" and pairs:
        k = draw(st.sampled_from([p[0] for p in pairs]))
        pairs.insert(draw(st.integers(0, len(pairs))), (k, draw(ODD)))
    raw = raw_map(pairs)
    if m == "not_map":
        return msgpack.packb([1, 2], use_bin_type=True)
    if m == "truncate":
        return raw[:draw(st.integers(0, max(0, len(raw) - 1)))]
    if m == "trailing":
        return raw + b"\x00"
    if m == "garbage":
        return b"\xc1" + raw
    return raw


@st.composite
def request(draw):
    """(header bytes, tensor frames) as a client might send them, good or bad."""
    tensors = draw(st.lists(tensor(), max_size=3))
    frames = [t[1] for t in tensors if t[1] is not None]
    if draw(st.integers(0, 9)) == 0:
        frames.append(b"\0" * 4) if draw(st.booleans()) or not frames else frames.pop()
    pairs = [("id", draw(st.text(min_size=1, max_size=6) | st.text(min_size=1, max_size=6) | st.sampled_from(["", "é" * MAX_ID_LEN, "r" * (MAX_ID_LEN + 1)])
                         | ODD)),
             ("inputs", [t[0] for t in tensors])]
    for key, values in [("version", st.integers(0, 5) | st.sampled_from([-1, 2**64 - 1, True, 1.0])),
                        ("timeout_ms", st.floats(0.1, 1e4) | st.integers(1, 1000)
                         | st.sampled_from([0, -1.0, 0.0, math.nan, math.inf, -math.inf, True, False, 2**64 - 1])),
                        ("ack", st.booleans() | st.sampled_from([1, 0, "yes"])),
                        ("tags", st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3)
                         | st.sampled_from([{"k": "v" * 256}, {"k": "v" * 257}, {f"k{i}": "" for i in range(17)},
                                            {"k": 1}, []]))]:
        if draw(st.booleans()):
            pairs.append((key, draw(values)))
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    return mutate(draw, list(pairs), ["id", "inputs", "version", "timeout_ms", "ack", "tags"]), frames


def python_request(raw: bytes, frames: list):
    """parse_request_header's verdict on the unpacked bytes: its fields, or "refused"."""
    try:
        p = parse_request_header(unpack_map(raw), frames)
    except ProtocolError:
        return "refused"
    return p.rid, p.inputs, p.version, p.timeout_ms, p.ack, p.tags


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request())
def test_the_compiled_request_check_accepts_only_what_python_accepts_with_the_same_values(req):
    raw, frames = req
    r = fastcheck.decode_request(raw)
    if r is None:
        return
    header = unpack(raw)  # what msgspec decoded, msgpack decodes, to the same fields
    assert fastcheck.frames_used(r) == request_frames(header)
    got = fastcheck.request_fields(r, frames) if fastcheck.frames_used(r) == len(frames) else None
    if got is not None:
        want = python_request(raw, frames)
        assert want != "refused"
        assert repr(got) == repr(want)  # repr: 1 and True and 1.0 told apart


@st.composite
def result(draw):
    """(header bytes, tensor frames) as a worker might answer, good or bad; epoch "e1", worker "w1"."""
    tensors = draw(st.lists(tensor(), max_size=3))
    frames = [t[1] for t in tensors if t[1] is not None]
    pairs = [("key", draw(st.sampled_from(["k1", "k1", "k1", "k" * MAX_ID_LEN, "k" * (MAX_ID_LEN + 1), ""]) | ODD)),
             ("attempt", draw(st.integers(1, 3) | st.sampled_from([0, 2**63 - 1, 2**63, True, 1.0]))),
             ("ok", draw(st.sampled_from([True] * 5 + [False, 1, None]))),
             ("version", draw(st.integers(0, 5) | st.sampled_from([-1, 2**64 - 1, True, 1.0, None]))),
             ("outputs", [t[0] for t in tensors])]
    for key, values in [("id", st.sampled_from(["c1", ""]) | ODD), ("model", st.sampled_from(["m", "m" * 128, "m" * 129]) | ODD),
                        ("batch_rows", st.integers(0, 64) | ODD), ("worker", st.sampled_from(["w1", "w2"]) | ODD),
                        ("epoch", st.sampled_from(["e1", "e2"]) | ODD),
                        ("timing", st.dictionaries(st.sampled_from(["queue_ms", "compute_ms", "", "q" * 32, "q" * 33]),
                                                   st.floats(-1, 2e9) | st.integers(-1, 2 * 10**9)
                                                   | st.sampled_from([math.nan, math.inf, 1e9, 10**9, True]), max_size=3)
                         | st.sampled_from([{f"t{i}": 1.0 for i in range(9)}, {1: 1.0}, [], None]))]:
        if draw(st.booleans()):
            pairs.append((key, draw(values)))
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    return mutate(draw, list(pairs), sorted(REPLY_FIELDS)), frames


def python_result(raw: bytes, frames: list, k: int, end: int):
    """What on_replies concludes of one result in Python: (frames used, checked_result's answer and the
    id) for a header it would check that way, "other" for one it would not, "refused" where it raises."""
    try:
        header = unpack_map(raw)
        n = _reply_frame_count(header)
        if k + n > end:
            return "refused"
        if not (header.get("ok") is True and header.keys() <= REPLY_FIELDS and type(header.get("version")) is int):
            return "other"
        return n, (*checked_result(header, frames[k:k + n], "e1", "w1"), header.get("id"))
    except ProtocolError:
        return "refused"


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(result())
def test_the_compiled_result_check_accepts_only_what_python_accepts_with_the_same_answer(res):
    raw, frames = res
    got = fastcheck.fast_result(raw, frames, 0, len(frames), "e1", "w1")
    if got is not None:
        assert repr(got) == repr(python_result(raw, frames, 0, len(frames)))


def results_message(draw_list):
    return packed_reply_frames([raw for raw, _ in draw_list], [f for _, fs in draw_list for f in fs])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(result(), min_size=1, max_size=5), st.sampled_from(["packed", "packed", "framing1", "extra", "short"]))
def test_split_results_is_split_replies_with_checked_results(results, form):
    if form == "framing1":
        frames = [f for raw, fs in results for f in (raw, *fs)]
    else:
        frames = results_message(results)
        if form == "extra":
            frames.append(b"\0" * 4)
        elif form == "short" and len(frames) > 1:
            frames.pop()
    try:
        want = split_replies(frames)
    except ProtocolError as exc:
        with pytest.raises(ProtocolError) as got:
            split_results(frames, "e1", "w1")
        assert str(got.value) == str(exc)
        return
    got = split_results(frames, "e1", "w1")
    assert len(got) == len(want)
    for (h, m, d, checked), (wh, wm, wd) in zip(got, want, strict=True):
        assert bytes(h) == bytes(wh) and [bytes(f) for f in d] == [bytes(f) for f in wd]
        if checked is None:
            assert repr(m) == repr(wm)
        else:
            assert m is None
            assert repr(checked) == repr((*checked_result(wm, wd, "e1", "w1"), wm.get("id")))
            assert wm.get("ok") is True and wm.keys() <= REPLY_FIELDS and type(wm.get("version")) is int


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["m", "mmi.x", ""]), request()), min_size=1, max_size=5),
       st.sampled_from(["ok", "ok", "extra", "short", "bad_row"]))
def test_split_batch_checked_is_split_batch_packed_with_the_requests_checked(reqs, form):
    rows = [[svc, raw] for svc, (raw, _) in reqs]
    if form == "bad_row":
        rows.insert(len(rows) // 2, ["m", "not bin"])
    frames = [pack(rows), *(f for _, (_, fs) in reqs for f in fs)]
    if form == "extra":
        frames.append(b"\0" * 4)
    elif form == "short" and len(frames) > 1:
        frames.pop()
    want, want_broken = split_batch_packed(frames)
    got, broken = split_batch_checked(frames)
    assert broken == want_broken
    assert len(got) == len(want)
    for (svc, raw, header, tensors, parsed), (wsvc, wraw, wheader, wtensors) in zip(got, want, strict=True):
        assert (svc, raw, [bytes(f) for f in tensors]) == (wsvc, wraw, [bytes(f) for f in wtensors])
        if parsed is None:
            assert repr(header) == repr(wheader)
        else:
            assert header is None
            p = parse_request_header(wheader, wtensors)
            assert repr(parsed) == repr(p)


def test_the_common_forms_take_the_compiled_path():
    """The forms the client, the master and the worker write do take it (else it would gain nothing)."""
    req = pack({"id": "r1", "inputs": [["x", "float32", [1, 2], b"\0" * 8], ["y", "int64", [3]]], "timeout_ms": 5.0,
                "tags": {"user": "u"}})
    got, broken = split_batch_checked([pack([["m", req]]), b"\0" * 24])
    assert broken is None and got[0][4] is not None and got[0][4].inputs[1] == ["y", "int64", [3]]
    res = pack({"id": "r1", "key": "k1", "attempt": 1, "ok": True, "model": "m", "version": 3, "batch_rows": 1,
                "outputs": [["y", "float32", [1], b"\0" * 4]], "worker": "w1", "epoch": "e1",
                "timing": {"queue_ms": 0.5, "compute_ms": 1}})
    ((_, m, _, checked),) = split_results(packed_reply_frames([res], []), "e1", "w1")
    assert m is None and checked == ("k1", 1, 3, True, "r1")
    ((_, m, _, checked),) = split_results(packed_reply_frames([res], []), "e2", "w1")
    assert checked == ("k1", 1, 3, False, "r1")


def test_what_msgspec_reads_differently_goes_to_python():
    """Forms where msgspec's own decoding would differ from msgpack's (an ext, a timestamp, an int
    key, a bin key, a duplicate field) never take the compiled path."""
    base = [("id", "r1"), ("inputs", [])]
    for pairs in ([*base, ("tags", {1: "a"})], [*base, ("ack", msgpack.ExtType(1, b""))],
                  [*base, ("version", msgpack.Timestamp(1, 0))], [(b"id", "r1"), ("inputs", [])],
                  [*base, ("id", "r2")]):
        raw = raw_map(pairs)
        r = fastcheck.decode_request(raw)
        if r is not None:  # a duplicate: msgspec must then read it as msgpack does (the last one wins)
            assert r.id == unpack_map(raw)["id"]


@pytest.mark.parametrize("entry", [["x", "float32", [0], b"", 1], ["x", "uint8", [1], b"a", None],
                                   ["x", "uint8", [1], b"a", b"b"]])
def test_a_tensor_entry_with_a_fifth_item_is_never_taken_by_the_compiled_path(entry):
    """An array_like msgspec struct ignores trailing items unless told not to: Python refuses a fifth
    item, so the compiled path must not take it (found by test_protocol_agreement's hypothesis run)."""
    raw = pack({"id": "r", "inputs": [entry]})
    assert fastcheck.decode_request(raw) is None
    assert python_request(raw, []) == "refused"
    res = pack({"key": "k1", "attempt": 1, "ok": True, "version": 1, "outputs": [entry]})
    assert fastcheck.fast_result(res, [], 0, 0, "e1", "w1") is None
    got, broken = split_batch_checked([pack([["m", raw]])])
    assert broken is None and got[0][4] is None  # handed to parse_request_header, which refuses it
