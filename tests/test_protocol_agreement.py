"""One fact, one check: the master (reading a client's message) and the worker (splitting the
master's coalesced REQUEST) must agree on every request's frames, id and verdict. Hypothesis feeds
both the same random requests (valid, mutated, coalesced) and compares what each concluded."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringserve.protocol import codec, envelope
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.envelope import (
    MAX_ID_LEN, answers_frames, batch_frames, batch_frames_packed, dispatch_chunks, dispatch_frames,
    dispatch_frames_packed, dispatch_one_packed, packed_reply_frames, parse_dispatch, parse_request_header, reply_frames, reply_parts,
    request_frames, split_batch, split_batch_packed, split_replies,
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


def worker_view(requests: list[tuple[bytes, list]], packed: bool = False) -> list:
    """What the worker concludes from one REQUEST carrying `requests`, by key (framing 2 if `packed`)."""
    entries = [([f"k{i}", 1, "m", None, 1000.0], raw, frames) for i, (raw, frames) in enumerate(requests)]
    got = {d.key: d for d in parse_dispatch((dispatch_frames_packed if packed else dispatch_frames)(entries))}
    assert set(got) == {f"k{i}" for i in range(len(requests))}  # every entry is answered by its key
    return [got[f"k{i}"] for i in range(len(requests))]


@pytest.mark.parametrize("packed", [False, True], ids=["framing1", "framing2"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=client_request())
def test_one_request_gets_one_verdict_from_both(req, packed):
    raw, frames = req
    verdict = master_verdict(raw, frames)
    (d,) = worker_view([req], packed)
    if verdict[0] == "ok":
        assert d.error is None, d.error
        assert (d.cid, len(d.frames)) == verdict[1:]
        assert request_frames(unpack_map(raw)) == len(frames)
    else:
        assert d.error is not None


@pytest.mark.parametrize("packed", [False, True], ids=["framing1", "framing2"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(client_request(), min_size=1, max_size=6))
def test_coalesced_requests_split_exactly_as_the_master_counted_them(reqs, packed):
    accepted = [r for r in reqs if master_verdict(*r)[0] == "ok"]
    if accepted:  # what a master really sends: only requests it accepted, side by side
        for (raw, frames), d in zip(accepted, worker_view(accepted, packed), strict=True):
            assert d.error is None, d.error
            assert d.cid == unpack_map(raw)["id"] and [bytes(f) for f in d.frames] == [bytes(f) for f in frames]
    # A mix (a buggy or hostile master): never raises, every entry answered, and whatever the worker
    # accepts is what the master would accept with the same frames. (Frames that do not add up cannot
    # be pinned on one request: an extra frame of a rejected request reads as its neighbour's header,
    # and frames left over at the end fail every entry, so a mix is not split request by request.)
    view = worker_view(reqs, packed)
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


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(client_request())
def test_the_fast_tensor_check_is_the_fast_walk_without_arrays(req):
    """codec._fast_check (what the master runs on every request and result) accepts exactly what
    _fast_walk(make=False) accepts, so it never passes what the full walk refuses."""
    raw, frames = req
    try:
        header = unpack_map(raw)
    except ProtocolError:
        return
    meta = header.get("inputs")
    assert codec._fast_check(meta, frames) == (codec._fast_walk(meta, frames, False) is not None)


def test_the_fast_tensor_check_refuses_a_name_twice_and_steps_aside_for_strings():
    one = ["x", "float32", [1], b"\0" * 4]
    assert codec._fast_check([one], []) and codec._fast_check([one, ["y", "float32", [1], b"\0" * 4]], [])
    assert not codec._fast_check([one, one], [])
    assert not codec._fast_check([one, ["y", "float32", [1]], ["x", "int8", [4], b"1234"]], [b"\0" * 4])
    assert not codec._fast_check([["s", "bytes", [1], b"\1\0\0\0a"]], [])  # strings: the full walk decides
    with pytest.raises(ProtocolError):
        codec.check_tensors([one, one], [])


# ------------------------------------------------------------ framing 2 (issue 22): packed headers
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(client_request(), min_size=1, max_size=6))
def test_both_request_framings_give_the_worker_the_same_requests(reqs):
    """What a master sends (requests it accepted) reads the same in either framing: keys, ids,
    headers and tensor frames; so a worker's verdict cannot depend on which framing its master chose."""
    accepted = [r for r in reqs if master_verdict(*r)[0] == "ok"] or reqs[:0]
    if not accepted:
        return
    one, two = worker_view(accepted, False), worker_view(accepted, True)
    for a, b in zip(one, two, strict=True):
        assert (a.key, a.cid, a.error, a.header) == (b.key, b.cid, b.error, b.header)
        assert [bytes(f) for f in a.frames] == [bytes(f) for f in b.frames]


def test_a_packed_request_is_one_frame_when_its_tensors_are_inline():
    good = pack({"id": "g", "inputs": [["x", "float32", [1], b"\0" * 4]]})
    big = pack({"id": "b", "inputs": [["x", "uint8", [70000]]]})
    entries = [(["a", 1, "m", None, 100.0], good, []), (["b", 1, "m", None, 100.0], big, [b"\1" * 70000])]
    frames = dispatch_frames_packed(entries)
    assert len(frames) == 2  # the list (both headers inside) and the one large tensor
    a, b = parse_dispatch(frames)
    assert a.error is None and b.error is None and a.cid == "g" and bytes(b.frames[0]) == b"\1" * 70000
    # a header that is not bin in a six-item entry breaks the split from there on, never before
    bad = msgpack.packb([["a", 1, "m", None, 100.0, good], ["b", 1, "m", None, 100.0, 7]])
    a, b = parse_dispatch([bad])
    assert a.error is None and b.error is not None and "could not split" in b.error


def test_a_request_packed_at_once_is_the_packed_request_or_declines():
    """dispatch_one_packed (the master's path for a REQUEST without out-of-line frames) writes exactly what
    dispatch_frames_packed writes, and declines whatever dispatch_chunks would cut in two."""
    entries = [([f"k{i}", 1, "m", None, 1.0], pack({"id": f"r{i}", "inputs": []}), []) for i in range(10)]
    rows = [[*fields, header] for fields, header, _ in entries]
    assert dispatch_one_packed(rows) == dispatch_frames_packed(entries)
    assert dispatch_one_packed(rows[:1]) == dispatch_frames_packed(entries[:1])
    size = sum(len(h) for _, h, _ in entries)
    assert len(dispatch_chunks(entries, max_bytes=size - 1)) == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(envelope, "MAX_PACKED_BYTES", size - 1)
        assert dispatch_one_packed(rows) is None and dispatch_one_packed(rows[:1]) is not None
        mp.setattr(envelope, "MAX_PER_MESSAGE", 9)
        assert dispatch_one_packed(rows) is None


def test_dispatch_chunks_stay_within_what_a_worker_takes():
    entries = [([f"k{i}", 1, "m", None, 1.0], b"x" * 10, []) for i in range(10)]
    assert [len(c) for c in dispatch_chunks(entries, max_count=4)] == [4, 4, 2]
    assert [len(c) for c in dispatch_chunks(entries, max_bytes=25)] == [2, 2, 2, 2, 2]
    assert [len(c) for c in dispatch_chunks(entries[:1], max_bytes=1)] == [1]  # one alone always goes


@st.composite
def reply(draw):
    """(reply header, its out-of-line frames) as a worker's compute thread writes them."""
    kind = draw(st.sampled_from(["result", "result", "error", "ack"]))
    key = draw(st.text(min_size=1, max_size=6))
    if kind == "error":
        return {"id": key, "key": key, "ok": False, "error": {"code": "INTERNAL", "message": "x"}, "attempt": 1}, []
    if kind == "ack":
        return {"id": key, "ack": True}, []
    outputs, frames = [], []
    for i in range(draw(st.integers(0, 3))):
        size = draw(st.integers(0, 6))
        if draw(st.booleans()):
            outputs.append([f"y{i}", "uint8", [size]])
            frames.append(bytes([i]) * size)
        else:
            outputs.append([f"y{i}", "uint8", [size], b"\2" * size])
    return {"id": key, "key": key, "attempt": 1, "ok": True, "version": 1, "outputs": outputs}, frames


def _view(split):
    return [(bytes(raw), header, [bytes(f) for f in data]) for raw, header, data in split]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(reply(), min_size=1, max_size=4), min_size=1, max_size=4))
def test_a_packed_reply_splits_as_the_same_replies_one_frame_each(turns):
    """The worker repacks what its compute thread handed over (reply_parts, per RESULT message) and
    the master splits it (split_replies): the same replies, header bytes and frames as framing 1."""
    plain, headers, data = [], [], []
    for replies in turns:
        part = reply_frames(replies)
        plain.extend(part)
        hs, ds = reply_parts(part, len(replies))
        headers.extend(hs)
        data.extend(ds)
    assert _view(split_replies(packed_reply_frames(headers, data))) == _view(split_replies(plain))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(reply(), min_size=1, max_size=4), st.sampled_from(["drop", "extra", "not_bin", "not_map", "empty"]))
def test_a_packed_reply_that_does_not_add_up_is_refused_whole(replies, how):
    headers, data = reply_parts(reply_frames(replies), len(replies))
    frames = packed_reply_frames(headers, data)
    if how == "drop" and data:
        frames = frames[:-1]
    elif how == "extra":
        frames = [*frames, b"\0"]
    elif how == "not_bin":
        frames = [msgpack.packb([*headers[:-1], 7]), *data]
    elif how == "not_map":
        frames = [msgpack.packb([*headers[:-1], msgpack.packb([1])]), *data]
    elif how == "empty":
        frames = [msgpack.packb([]), *data]
    else:
        return
    with pytest.raises(ProtocolError):
        split_replies(frames)


# ------------------------------------------------ coalesced client traffic, packed ("mmi.batch2")
SERVICES = st.sampled_from(["m", "echo", "mmi.x", ""]) | st.text(max_size=4)


def _entries(split):
    return [(svc, bytes(raw), header, [bytes(f) for f in data]) for svc, raw, header, data in split[0]], split[1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(SERVICES, client_request()), min_size=1, max_size=6))
def test_both_client_batch_framings_split_into_the_same_requests(reqs):
    """The master splits a client's batch with split_batch ("mmi.batch") or split_batch_packed
    ("mmi.batch2"), as the client built it (batch_frames / batch_frames_packed): requests whose frames
    add up come out the same in both, with the same frames; a mix never raises, and every entry either
    splits is one whose header counts exactly its frames (request_frames)."""
    chunk = [(svc.encode(), [raw, *frames]) for svc, (raw, frames) in reqs]
    one = _entries(split_batch(batch_frames(chunk)))
    two = _entries(split_batch_packed(batch_frames_packed(chunk)))
    for entries, _ in (one, two):
        for _, _, header, data in entries:
            assert request_frames(header) == len(data)
    counted = all(request_frames(_header_or_none(raw)) == len(frames) for _, (raw, frames) in reqs)
    if counted:
        assert one == two and one[1] is None
        assert [(svc, raw) for svc, raw, _, _ in two[0]] == [(svc, raw) for svc, (raw, _) in reqs]


def _header_or_none(raw: bytes):
    try:
        return unpack_map(raw)
    except ProtocolError:
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(reply(), min_size=1, max_size=6))
def test_a_client_reads_both_answer_framings_alike(replies):
    """The master's answers to a batching client (answers_frames, either form) split on the client
    (split_replies) into the same headers and frames."""
    bodies = [[pack(h), *frames] for h, frames in replies]
    assert _view(split_replies(answers_frames(bodies, True))) == _view(split_replies(answers_frames(bodies, False)))


def test_a_packed_client_batch_that_breaks_keeps_what_came_before():
    good = pack({"id": "g", "inputs": [["x", "float32", [1], b"\0" * 4]]})
    frames = batch_frames_packed([(b"m", [good]), (b"m", [good])])
    entries, broken = split_batch_packed([msgpack.packb([["m", good], ["m", 7]])])
    assert len(entries) == 1 and "bin" in broken
    assert split_batch_packed([b"\xc1"]) == ([], split_batch_packed([msgpack.packb({})])[1])
    entries, broken = split_batch_packed([*frames, b"extra"])
    assert len(entries) == 2 and "frames no request accounts for" in broken


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=client_request())
def test_the_masters_compiled_check_and_the_workers_split_give_one_verdict(req):
    """The master's mmi.batch2 path with the compiled check (envelope.split_batch_checked, msgspec) and
    the worker's parse_dispatch agree on each request: accepted by one exactly when by the other, with
    the same id and frames."""
    raw, frames = req
    got, broken = envelope.split_batch_checked([pack([["m", raw]]), *frames])
    if broken is None:
        ((_, _, header, tensors, parsed),) = got
        if parsed is None:
            try:
                parsed = parse_request_header(header, tensors)
            except ProtocolError:
                parsed = None
        verdict = ("bad",) if parsed is None else ("ok", parsed.rid, len(tensors))
    else:
        verdict = ("bad",)
    assert verdict == master_verdict(raw, frames)  # the compiled path changes no verdict
    (d,) = worker_view([req], packed=True)
    if verdict[0] == "ok":
        assert d.error is None, d.error
        assert (d.cid, len(d.frames)) == verdict[1:]
    else:
        assert d.error is not None
