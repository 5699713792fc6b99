"""The client's compiled answer path (protocol/fastanswer.py: msgspec) against the Python path it stands in for.

It may only ever accept, and only what Python accepts, with the same values: hypothesis feeds both the
same random answer messages (valid results, mutated fields, wrong types, bool for int, NaN and inf,
huge ints, extra fields, int keys, ext types, errors, ACKs, other epochs, duplicates, wrong frame
counts, truncated bytes), once to the splitters and once to two clients' books (one with the compiled
path switched off), and compares verdicts, values and every future's outcome."""
from __future__ import annotations

import concurrent.futures
import math

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringserve.client import reliable
from ringserve.client.reliable import Reliability, new_pending
from ringserve.protocol import fastanswer
from ringserve.protocol.codec import check_tensors, pack, unpack_map
from ringserve.protocol.envelope import packed_reply_frames, split_replies
from ringserve.protocol.messages import ProtocolError

pytestmark = pytest.mark.timeout(120)

ITEM = {"float32": 4, "int64": 8, "uint8": 1, "bool": 1, "float16": 2, "float64": 8}
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4), st.binary(max_size=4), st.lists(st.integers(-2, 3), max_size=2),
    st.dictionaries(st.integers(0, 3), st.integers(0, 3), max_size=1),
    st.dictionaries(st.text(max_size=2), st.booleans(), max_size=2),
    st.just(msgpack.ExtType(5, b"x")), st.just(msgpack.Timestamp(1, 0)),
)
RIDS = ["r0", "r1", "r2", "r3"]
EPOCHS = ["e1", "e2"]


@st.composite
def tensor(draw):
    """(meta entry, its out-of-line frame or None): seven in eight valid, the rest with something odd."""
    if draw(st.integers(0, 7)):
        name, dtype = draw(st.sampled_from(["y", "z", "out"])), draw(st.sampled_from(sorted(ITEM)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        data = b"\1" * (math.prod(shape) * ITEM[dtype])
        return ([name, dtype, shape], data) if draw(st.booleans()) else ([name, dtype, shape, data], None)
    name = draw(st.sampled_from(["y", "z", "é" * 128, "n" * 129]) | st.text(max_size=3))
    dtype = draw(st.sampled_from(sorted(ITEM)) | st.sampled_from(["bytes", "complex64", ""]) | ODD)
    shape = draw(st.lists(st.integers(0, 4), max_size=3) | st.lists(st.integers(0, 3), min_size=9, max_size=9)
                 | st.sampled_from([[-1], [True], [2.0], [2**31], [2**20, 2**20, 2], "2", None]) | ODD)
    size = 1
    for d in shape if isinstance(shape, list) else []:
        size *= d if type(d) is int and 0 <= d < 100 else 1
    good = size * ITEM.get(dtype, 1) if isinstance(dtype, str) else 1
    data = b"\0" * draw(st.sampled_from([good, good, max(0, good - 1), good + 1]))
    how = draw(st.sampled_from(["frame", "inline", "odd", "two"]))
    if how == "frame":
        return [name, dtype, shape], data
    if how == "inline":
        return [name, dtype, shape, data], None
    return ([name, dtype, shape, draw(ODD)], None) if how == "odd" else ([name, dtype], None)


@st.composite
def answer(draw):
    """(header bytes, its out-of-line frames): a result as a worker writes it, mutated or not, or an
    error, an ACK, a ping's answer."""
    kind = draw(st.sampled_from(["result"] * 12 + ["ack", "error", "ping"]))
    epoch = draw(st.sampled_from(EPOCHS))
    if kind == "error":
        h = {"id": draw(st.sampled_from(RIDS)), "ok": False, "epoch": epoch,
             "error": draw(st.sampled_from([{"code": 503, "message": "busy"}, {"code": 400, "message": "x"}])),
             "retry_after_s": draw(st.none() | st.floats(0, 2))}
        return pack(h), []
    if kind == "ping":
        return pack({"ok": True, "epoch": epoch}), []
    if kind == "ack":
        return pack({"id": draw(st.sampled_from(RIDS)), "ok": True, "ack": True, "epoch": epoch, "outputs": []}), []
    entries = draw(st.lists(tensor(), max_size=3, unique_by=lambda e: e[0][0]) if draw(st.integers(0, 3))
                   else st.lists(tensor(), max_size=3))  # a name seen twice now and then
    meta = [m for m, _ in entries]
    frames = [f for _, f in entries if f is not None]
    h = {"id": draw(st.sampled_from(RIDS)), "key": "k1", "attempt": 1, "ok": True, "version": 3,
         "outputs": meta, "worker": "w-1", "epoch": epoch, "batch_rows": 2,
         "timing": {"queue_ms": 0.25, "compute_ms": 1}}
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        field = draw(st.sampled_from(sorted(h) + ["ack", "model", "extra"]))
        what = draw(st.sampled_from(["drop", "odd", "odd"]))
        if what == "drop":
            h.pop(field, None)
        else:
            h[field] = draw(ODD)
    raw = msgpack.packb(h) if draw(st.integers(0, 19)) else msgpack.packb(h)[:-1]
    if draw(st.integers(0, 19)) == 0:  # an int key (Python refuses it), or a duplicate key (the last counts)
        raw = (bytes([raw[0] + 1]) + msgpack.packb(draw(st.sampled_from([7, "id", "ok", "epoch"])))
               + msgpack.packb(draw(ODD)) + raw[1:]) if 0x80 <= raw[0] < 0x8f else raw
    return raw, frames


@st.composite
def message(draw):
    """The frames after "mmi.batch2": the packed headers, their frames (one too many or too few sometimes)."""
    answers = draw(st.lists(answer(), min_size=1, max_size=5))
    frames = [f for _, fs in answers for f in fs]
    how = draw(st.sampled_from(["ok"] * 16 + ["extra", "short", "odd_first"]))
    if how == "extra":
        frames.append(b"\0" * 4)
    elif how == "short" and frames:
        frames.pop()
    body = packed_reply_frames([raw for raw, _ in answers], frames)
    if how == "odd_first":
        body[0] = msgpack.packb(draw(st.lists(ODD, max_size=2)))
    return [zmq.Frame(f) for f in body]  # as recv_frames hands them over


SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(message())
def test_split_answers_accepts_only_what_split_replies_accepts_with_the_same_values(frames):
    fast = fastanswer.split_answers(frames)
    try:
        slow = split_replies(frames)
    except ProtocolError:
        slow = None
    if fast is None:
        return
    assert slow is not None, "the compiled path took a message Python refuses"
    assert len(fast) == len(slow)
    for (a_raw, rid, epoch, ack, version, worker, meta, a_data), (raw, header, data) in zip(fast, slow):
        assert a_raw == raw and unpack_map(a_raw) == header
        assert header.get("ok") is True and type(header.get("id")) is str
        assert (rid, epoch, ack, version, worker) == (
            header["id"], header.get("epoch"), header.get("ack"), header.get("version"), header.get("worker"))
        assert meta == header.get("outputs", []) and [bytes(f) for f in a_data] == [bytes(f) for f in data]
        check_tensors(header.get("outputs"), data)  # raises if Python refuses the tensors


def test_a_plain_result_takes_the_compiled_path():
    good = {"id": "r0", "key": "k", "attempt": 1, "ok": True, "version": 1, "worker": "w", "epoch": "e1",
            "outputs": [["y", "float32", [1, 2], b"\0" * 8], ["z", "uint8", [3]]], "timing": {"compute_ms": 0.5}}
    got = fastanswer.split_answers(packed_reply_frames([pack(good)], [b"abc"]))
    assert got is not None and got[0][6] == good["outputs"][:1] + [["z", "uint8", [3]]]
    assert fastanswer.split_answers(packed_reply_frames([pack(good)], [b"ab"])) is None  # 2 bytes for 3
    assert fastanswer.split_answers(packed_reply_frames([pack({**good, "ok": False})], [b"abc"])) is None


def _books():
    rel = Reliability(3600.0, 3600.0, 3600.0)
    rel.epoch = "e1"
    futures = {}
    for rid in RIDS[:3]:  # r3 is never pending: its answers are duplicates
        f = concurrent.futures.Future()
        futures[rid] = f
        rel.start(None, new_pending(rid, "m", {}, 30.0, 1.0, 3600.0, None, None, f))
    rel.outgoing.clear()
    return rel, futures


def _outcome(rel, futures):
    out = {}
    for rid, f in futures.items():
        if not f.done():
            out[rid] = ("pending", rel.pending[rid].acked_epoch, rel.pending[rid].sends)
        elif f.exception() is not None:
            e = f.exception()
            out[rid] = (type(e).__name__, str(e))
        else:
            r = f.result()
            raw = r.raw
            out[rid] = ("ok", r.id, r.version, r.worker, r.header,
                        None if raw is None else (raw[0], [bytes(x) for x in raw[1]]),
                        {k: v.tolist() for k, v in r.outputs.items()})
    s = rel.stats
    return out, rel.epoch, (s.duplicates_dropped, s.master_restarts, s.batches_received, s.sent, s.resent)


@SETTINGS
@given(st.lists(message(), min_size=1, max_size=3))
def test_a_client_decides_every_answer_the_same_with_and_without_the_compiled_path(messages):
    fast_rel, fast_f = _books()
    slow_rel, slow_f = _books()
    for frames in messages:
        fast_rel.on_batch(None, frames, packed=True)
        real = reliable.split_answers
        reliable.split_answers = lambda frames: None
        try:
            slow_rel.on_batch(None, frames, packed=True)
        finally:
            reliable.split_answers = real
    # compared as text: a NaN the peer sent (e.g. "attempt": nan) is equal to itself only in repr
    assert repr(_outcome(fast_rel, fast_f)) == repr(_outcome(slow_rel, slow_f))
