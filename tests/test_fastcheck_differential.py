"""A differential test of the compiled accept paths (issue 22, review 10), at the byte level.

protocol/fastcheck.py and protocol/fastanswer.py (msgspec) stand in for Python checks of
protocol/envelope.py and protocol/codec.py. "One fact, one check" asks that both agree on every
message: what a compiled path accepts, the Python path accepts with the same parsed fields; what it
does not take goes to the Python path, whose verdict and wording then stand. Each pair the roles use
is fed the same messages here, through the function the role calls:

- the master reading a client's "mmi.batch2": split_batch_checked (fastcheck.decode_request,
  request_fields, frames_used) against split_batch_packed + parse_request_header;
- the master reading a worker's framing-2 REPLY: split_results (fastcheck.decode_packed, fast_result)
  against split_replies + checked_result;
- the worker reading a framing-2 REQUEST: parse_dispatch (fastcheck.decode_routes, request_arrays)
  against envelope._python_dispatch + decode_tensors;
- the client reading a packed answer message: fastanswer.split_answers against split_replies + the
  client's own tensor check (check_tensors).

Where the compiled path took a message the final outcome (values, or the error string that would
reach a peer) is compared with the Python path's; where it did not, the outcome is the Python path's by
construction, and that is checked too (the role's function must give exactly the Python answer).

The messages are built with the protocol's own builders and then mutated where tests/test_proto8_fastcheck.py
and its siblings do not reach: every value re-encoded in a wider msgpack form than msgpack-python writes
(uint64 for 1, str32 for "a", float32, map32...), strings that are not UTF-8 (in keys, ids, names,
dtypes), values nested deeper than msgpack-python unpacks, huge ints, NaN and inf, missing, extra and
duplicate keys, truncation at any byte, a byte changed anywhere, trailing bytes, and frame counts off
by one either way. Bounded: the whole file runs in well under 40 s on one core.
"""
from __future__ import annotations

import math
import random
import struct

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ringserve.protocol import codec, envelope, fastanswer, fastcheck
from ringserve.protocol.codec import check_tensors, decode_tensors, pack, unpack_map
from ringserve.protocol.envelope import (
    MAX_ID_LEN, REPLY_FIELDS, checked_result, dispatch_frames_packed, packed_reply_frames, parse_dispatch,
    parse_request_header, request_frames, split_batch_checked, split_batch_packed, split_replies, split_results,
)
from ringserve.protocol.messages import ProtocolError

pytestmark = pytest.mark.timeout(120)

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ITEM = {"float32": 4, "int64": 8, "uint8": 1, "bool": 1, "float16": 2, "float64": 8, "int8": 1, "int16": 2,
        "int32": 4}
EPOCH, WORKER = "e1", "w1"


# ------------------------------------------------------------------ a msgpack writer with every form
class BadStr(bytes):
    """A msgpack str whose bytes are not valid UTF-8 (msgpack-python cannot write one)."""


class Deep:
    """`value` inside `depth` one-item arrays."""

    def __init__(self, depth: int, value) -> None:
        self.depth, self.value = depth, value


class Pairs(list):
    """A msgpack map written from (key, value) pairs as given: duplicate and odd keys kept."""


BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"a\xe9", b"\xf4\x90\x80\x80", b"\xe2\x82"]


def _head(n: int, fix: int | None, fixmax: int, codes: tuple, rnd: random.Random | None) -> bytes:
    """The header of a str/bin/array/map of length n in a form chosen by rnd (the shortest without rnd)."""
    forms = []
    if fix is not None and n <= fixmax:
        forms.append(bytes([fix | n]))
    for code, size in codes:
        if code is not None and n < 1 << (8 * size):
            forms.append(bytes([code]) + n.to_bytes(size, "big"))
    return forms[0] if rnd is None else rnd.choice(forms)


def _int_forms(v: int) -> list[bytes]:
    forms = []
    if 0 <= v < 128:
        forms.append(bytes([v]))
    if -32 <= v < 0:
        forms.append(struct.pack("b", v))
    for code, fmt, lo, hi in ((0xCC, ">B", 0, 2**8), (0xCD, ">H", 0, 2**16), (0xCE, ">I", 0, 2**32),
                              (0xCF, ">Q", 0, 2**64), (0xD0, ">b", -2**7, 2**7), (0xD1, ">h", -2**15, 2**15),
                              (0xD2, ">i", -2**31, 2**31), (0xD3, ">q", -2**63, 2**63)):
        if lo <= v < hi:
            forms.append(bytes([code]) + struct.pack(fmt, v))
    return forms


def enc(v, rnd: random.Random | None = None) -> bytes:
    """msgpack bytes of v: the shortest forms (as msgpack-python writes them) without rnd, else each
    node in a form rnd picks among the valid ones (a wider int, str, bin, array or map header, float32
    where it holds the value exactly)."""
    if isinstance(v, Deep):
        return b"\x91" * v.depth + enc(v.value, rnd)
    if v is None:
        return b"\xc0"
    if v is True or v is False:
        return b"\xc3" if v else b"\xc2"
    if type(v) is int:
        forms = _int_forms(v)
        return forms[0] if rnd is None else rnd.choice(forms)
    if type(v) is float:
        f64 = b"\xcb" + struct.pack(">d", v)
        if rnd is None or rnd.random() < 0.5:
            return f64
        try:
            f32 = struct.pack(">f", v)
        except OverflowError:
            return f64
        same = struct.unpack(">f", f32)[0]
        return b"\xca" + f32 if (same == v or (math.isnan(v) and math.isnan(same))) else f64
    if isinstance(v, BadStr):
        return _head(len(v), 0xA0, 31, ((0xD9, 1), (0xDA, 2), (0xDB, 4)), rnd) + bytes(v)
    if type(v) is str:
        b = v.encode("utf-8", "surrogatepass")
        return _head(len(b), 0xA0, 31, ((0xD9, 1), (0xDA, 2), (0xDB, 4)), rnd) + b
    if type(v) is bytes:
        return _head(len(v), None, 0, ((0xC4, 1), (0xC5, 2), (0xC6, 4)), rnd) + v
    if isinstance(v, Pairs):
        return _head(len(v), 0x80, 15, ((None, 0), (0xDE, 2), (0xDF, 4)), rnd) + b"".join(
            enc(k, rnd) + enc(x, rnd) for k, x in v)
    if type(v) is dict:
        return enc(Pairs(v.items()), rnd)
    if type(v) is list:
        return _head(len(v), 0x90, 15, ((None, 0), (0xDC, 2), (0xDD, 4)), rnd) + b"".join(enc(x, rnd) for x in v)
    return msgpack.packb(v, use_bin_type=True)  # ExtType, Timestamp


def test_the_writer_writes_what_msgpack_reads():
    """The writer's forms are all valid msgpack that reads back as the value (its shortest form is
    msgpack-python's own), and msgspec reads the wide forms as msgpack-python does."""
    rnd = random.Random(7)
    for v in [0, 1, 127, 128, -1, -33, 2**63 - 1, 2**64 - 1, -2**63, 1.5, math.inf, "", "a" * 40, "é", b"",
              b"x" * 300, [], [1, [2, "x"]], {"id": "r", "inputs": [["x", "float32", [1], b"\0" * 4]]}]:
        assert enc(v) == msgpack.packb(v, use_bin_type=True)
        for _ in range(20):
            raw = enc(v, rnd)
            assert msgpack.unpackb(raw, raw=False) == v
    raw = enc({"id": "r", "inputs": [["x", "float32", [1], b"\0" * 4]]}, random.Random(3))
    assert fastcheck.decode_request(raw) is not None


# ------------------------------------------------------------------ values, good and odd
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.sampled_from([2**64 - 1, -2**63, 2**63, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, -0.0]),
    st.text(max_size=3), st.binary(max_size=3), st.sampled_from(BAD_UTF8).map(BadStr),
    st.lists(st.integers(-1, 3), max_size=2), st.dictionaries(st.integers(0, 3), st.integers(0, 3), max_size=1),
    st.integers(1, 40).map(lambda d: Deep(d, 1)), st.sampled_from([Deep(600, 1), Deep(3000, "x")]),
    st.just(msgpack.ExtType(5, b"x")), st.just(msgpack.Timestamp(1, 0)),
)


@st.composite
def tensor(draw, names=("x", "y", "ids")):
    """(meta entry, its out-of-line frame or None, whether left as made): mostly a valid numeric tensor, sometimes with one
    part odd (a name not UTF-8, a dtype of another type, a shape too long or with a huge dim, data
    of the wrong length or type, an item too many or too few), or a valid string tensor."""
    name = draw(st.sampled_from(names))
    dtype = draw(st.sampled_from(sorted(ITEM)))
    shape = draw(st.lists(st.integers(0, 3), max_size=3))
    data = b"\1" * (math.prod(shape) * ITEM[dtype])
    inline = draw(st.booleans())
    what = draw(st.sampled_from(["ok"] * 10 + ["name", "dtype", "shape", "dim", "data", "len", "items", "strings"]))
    if what == "name":
        name = draw(st.sampled_from(["", "n" * 129, "é" * 128, "😀" * 128]) | st.sampled_from(BAD_UTF8).map(BadStr) | ODD)
    elif what == "dtype":
        dtype = draw(st.sampled_from(["bytes", "complex64", "", "Float32", "float32\0"])
                     | st.sampled_from(BAD_UTF8).map(BadStr) | ODD)
    elif what == "shape":
        shape = draw(st.sampled_from([[0] * 9, [1] * 9, [2**20, 2**20, 2], [2**20, 2**20, 0], "1", None, {}]) | ODD)
        data = b""
    elif what == "dim":
        shape = [*shape[:1], draw(st.sampled_from([-1, 2**31, 2**31 - 1, 2**64 - 1, True, 1.0, None, "1"]) | ODD)]
        data = b""
    elif what == "data":
        inline = True
        data = draw(st.sampled_from([None, "", "\0" * len(data), [], 0]) | ODD)
    elif what == "len":
        data = data + b"\0" if draw(st.booleans()) or not data else data[:-1]
    elif what == "items":
        return ([name, dtype, shape, data, draw(ODD)], None, False) if draw(st.booleans()) else ([name, dtype], None, False)
    elif what == "strings":  # the compiled paths leave string tensors to Python, which accepts them
        dtype, shape, data = "bytes", [2], b"\1\0\0\0a\0\0\0\0"
    return ([name, dtype, shape, data], None, what == "ok") if inline else ([name, dtype, shape], data, what == "ok")


def mutate_pairs(draw, pairs: list, fields: list) -> list:
    """One of the ways a peer's map can be wrong, on its (key, value) pairs (most stay as they are)."""
    m = draw(st.sampled_from(["none"] * 12 + ["drop", "odd", "extra", "dup", "dup_odd", "bad_key", "bin_key",
                                             "int_key", "deep"]))
    if not pairs:
        return pairs
    i = draw(st.integers(0, len(pairs) - 1))
    if m == "drop":
        pairs.pop(i)
    elif m == "odd":
        pairs[i] = (pairs[i][0], draw(ODD))
    elif m == "extra":
        pairs.insert(draw(st.integers(0, len(pairs))), (draw(st.sampled_from(["x", "error", "idd", "Id"])), draw(ODD)))
    elif m == "dup":  # the same key twice, the same or another good value: msgpack keeps the last
        pairs.insert(draw(st.integers(0, len(pairs))), pairs[i])
    elif m == "dup_odd":
        pairs.insert(draw(st.integers(0, len(pairs))), (pairs[i][0], draw(ODD)))
    elif m == "bad_key" and type(pairs[i][0]) is str:
        pairs[i] = (BadStr(pairs[i][0].encode() + draw(st.sampled_from(BAD_UTF8))), pairs[i][1])
    elif m == "bin_key" and type(pairs[i][0]) is str:
        pairs[i] = (pairs[i][0].encode(), pairs[i][1])
    elif m == "int_key":
        pairs[i] = (draw(st.integers(0, 3)), pairs[i][1])
    elif m == "deep":
        pairs[i] = (pairs[i][0], Deep(draw(st.sampled_from([1, 2, 600, 2000])), pairs[i][1]))
    return pairs


def mutate_bytes(draw, raw: bytes) -> bytes:
    """A byte-level change now and then: truncated anywhere, a trailing byte, one byte changed."""
    m = draw(st.sampled_from(["none"] * 14 + ["truncate", "trailing", "flip"]))
    if m == "truncate" and raw:
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if m == "trailing":
        return raw + bytes([draw(st.integers(0, 255))])
    if m == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    return raw


def write(draw, pairs: list, fields: list, valid: list) -> bytes:
    """The map's bytes: its pairs maybe mutated, maybe shuffled, every node in a random (valid) form,
    then maybe changed at the byte level. `valid` gets True when nothing was mutated."""
    before = list(pairs)
    pairs = mutate_pairs(draw, list(pairs), fields)
    if draw(st.booleans()):
        pairs = draw(st.permutations(pairs))
    rnd = random.Random(draw(st.integers(0, 2**32))) if draw(st.booleans()) else None
    raw = enc(Pairs(pairs), rnd)
    out = mutate_bytes(draw, raw)
    valid.append(out == raw and sorted(map(repr, pairs)) == sorted(map(repr, before)))
    return out


def _frames_off(draw, frames: list) -> list:
    """The message's frames, now and then one too many or one too few; as bytes, or as the roles get
    them (zmq.Frame), or as memoryviews."""
    m = draw(st.sampled_from(["ok"] * 10 + ["extra", "short", "empty_frame"]))
    if m == "extra":
        frames.insert(draw(st.integers(1, len(frames))), b"\0" * draw(st.sampled_from([0, 1, 4, 8])))
    elif m == "short" and len(frames) > 1:
        frames.pop(draw(st.integers(1, len(frames) - 1)))
    elif m == "empty_frame" and len(frames) > 1:
        frames[draw(st.integers(1, len(frames) - 1))] = b""
    kind = draw(st.sampled_from(["bytes", "bytes", "frame", "view"]))
    if kind == "frame":
        return [zmq.Frame(f) for f in frames]
    return [memoryview(f) for f in frames] if kind == "view" else frames


def _frame_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def _content(a: np.ndarray):
    """An array's values as comparable bytes: a string tensor (object dtype) by its items, since
    the bytes of an object array are the addresses of its items."""
    return a.tolist() if a.dtype.kind == "O" else a.tobytes()


# ------------------------------------------------------------------ client request headers
@st.composite
def request(draw):
    """(header bytes, its tensor frames, whether left unmutated): request_header()'s map, then mutated."""
    tensors = draw(st.lists(tensor(), max_size=3))
    meta, frames = [t[0] for t in tensors], [t[1] for t in tensors if t[1] is not None]
    header = envelope.request_header(
        draw(st.sampled_from(["r1", "r2", "é" * MAX_ID_LEN, "😀" * MAX_ID_LEN, "r" * (MAX_ID_LEN + 1), ""])
             | st.text(min_size=1, max_size=4)),
        meta, version=draw(st.none() | st.integers(0, 3) | st.sampled_from([2**63 - 1, 2**64 - 1])),
        timeout_ms=draw(st.none() | st.floats(0.001, 1e6) | st.sampled_from([math.inf, 1e308])),
        ack=draw(st.booleans()),
        tags=draw(st.none() | st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3)
                  | st.sampled_from([{"k": "v" * 256}, {"k": "v" * 257}, {f"k{i}": "" for i in range(16)},
                                     {f"k{i}": "" for i in range(17)}])))
    odd = draw(st.integers(0, 5)) == 0
    if odd:  # the other forms parse_request_header takes or refuses: int timeout, nil fields, ack 1
        header[draw(st.sampled_from(["timeout_ms", "version", "ack", "tags"]))] = draw(
            st.sampled_from([None, 5, 0, -1, 1.0, True, 1, "1", math.nan, -math.inf]))
    valid: list = []
    raw = write(draw, list(header.items()), ["id", "inputs", "version", "timeout_ms", "ack", "tags"], valid)
    return raw, frames, valid[0] and not odd and all(t[2] for t in tensors)


def python_request(raw: bytes, frames: list):
    """parse_request_header's outcome: the ClientRequest's repr, or the refusal's words."""
    try:
        return repr(parse_request_header(unpack_map(raw), frames))
    except ProtocolError as exc:
        return f"refused: {exc}"


def batch_outcome(entries: list, broken) -> list:
    """What the master concludes of each request of a batch: (service, header bytes, frames,
    parse_request_header's outcome) and why the rest could not be split."""
    out = []
    for svc, raw, header, tensors, *parsed in entries:
        p = parsed[0] if parsed else None
        if p is not None:
            assert header is None
            verdict = repr(p)
        else:
            try:
                verdict = repr(parse_request_header(header, tensors)) if type(header) is dict else "not a map"
            except ProtocolError as exc:
                verdict = f"refused: {exc}"
        out.append((svc, bytes(raw), _frame_bytes(tensors), verdict))
    return [out, broken]


@SETTINGS
@given(request())
def test_one_request_header_gets_one_verdict(req):
    """fastcheck's request functions, each against the Python function it stands in for."""
    raw, frames, valid = req
    want = python_request(raw, frames)
    r = fastcheck.decode_request(raw)
    valid = valid and not want.startswith("refused")
    if valid:  # the builders' own forms, numeric tensors, accepted by Python: the compiled path takes them
        assert r is not None, (raw, frames, want)
    if r is None:
        return
    header = unpack_map(raw)  # whatever msgspec decodes, msgpack decodes (else it would refuse)
    assert fastcheck.frames_used(r) == request_frames(header)
    got = fastcheck.request_fields(r, frames)
    if valid:
        assert got is not None, (raw, frames, want)
    event(f"request: compiled {'took it' if got is not None else 'left it to Python'}")
    if got is not None:
        assert repr(envelope.ClientRequest(*got)) == want, "the compiled path took what Python refuses or reads otherwise"
    arrays = fastcheck.request_arrays(r, frames)  # the worker's pass over the same header
    assert (arrays is None) == (got is None)
    if arrays is not None:
        python = decode_tensors(header["inputs"], frames)
        assert list(arrays) == list(python)
        for name, a in arrays.items():
            assert a.dtype == python[name].dtype and a.shape == python[name].shape
            assert _content(a) == _content(python[name])


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["m", "mmi.x", ""]), request()), min_size=1, max_size=4),
       st.sampled_from(["ok"] * 6 + ["bad_row", "str_header", "seven", "trunc_first", "many"]), st.data())
def test_the_master_concludes_the_same_of_a_packed_client_batch(reqs, form, data):
    """split_batch_checked (compiled where it can) against split_batch_packed + parse_request_header:
    every request's verdict and wording, the split, and why a break happened."""
    rows = [[svc, raw] for svc, (raw, _, _) in reqs]
    if form == "bad_row":
        rows.insert(len(rows) // 2, ["m", "not bin"])
    elif form == "str_header":
        rows[0] = ["m", BadStr(rows[0][1][:8])]
    elif form == "seven":
        rows[-1] = [*rows[-1], 1]
    first = enc(rows)
    if form == "trunc_first":
        first = first[:-1]
    elif form == "many":
        first = enc(rows * 300)  # 1200 > MAX_CLIENT_BATCH rows
    frames = [first, *(f for _, (_, fs, _) in reqs for f in fs)]
    frames = _frames_off(data.draw, frames)
    got = split_batch_checked(frames)
    event(f"batch: {sum(e[4] is not None for e in got[0])} of {len(got[0])} requests compiled")
    assert batch_outcome(*got) == batch_outcome(*split_batch_packed(frames))


# ------------------------------------------------------------------ worker result headers
@st.composite
def result(draw):
    """(header bytes, its frames, unmutated): a worker's result as its compute loop writes it, mutated."""
    tensors = draw(st.lists(tensor(), max_size=3))
    meta, frames = [t[0] for t in tensors], [t[1] for t in tensors if t[1] is not None]
    h = {"id": draw(st.sampled_from(["c1", "c2"])), "key": draw(st.sampled_from(["k1", "k" * MAX_ID_LEN])),
         "attempt": draw(st.sampled_from([1, 2, 2**63 - 1])), "ok": True,
         "model": draw(st.sampled_from(["m", "m" * 128])), "version": draw(st.sampled_from([0, 3, 2**63 - 1])),
         "batch_rows": draw(st.integers(1, 64)), "outputs": meta,
         "worker": draw(st.sampled_from([WORKER, WORKER, "w2"])), "epoch": draw(st.sampled_from([EPOCH, EPOCH, "e2"])),
         "timing": draw(st.dictionaries(st.sampled_from(["queue_ms", "compute_ms", "q" * 32]),
                                        st.floats(0, 1e9) | st.integers(0, 10**9), max_size=3))}
    for f in draw(st.lists(st.sampled_from(["id", "model", "batch_rows", "worker", "epoch", "timing"]), max_size=3)):
        h.pop(f, None)
    odd = draw(st.integers(0, 3)) == 0
    if odd:  # values at and past the bounds the Python checks draw
        h[draw(st.sampled_from(["key", "attempt", "version", "model", "batch_rows", "timing", "ok"]))] = (
                      draw(st.sampled_from([0, -1, 2**63, 2**64 - 1, True, 1.0, None, "", "m" * 129, "k" * 129,
                                            {"q" * 33: 1}, {"": 1}, {"a": math.nan}, {"a": math.inf},
                                            {"a": -0.0}, {"a": 1e9}, {"a": 10**9 + 1}, {"a": True},
                                            {f"t{i}": 1 for i in range(9)}])))
    valid: list = []
    raw = write(draw, list(h.items()), sorted(REPLY_FIELDS), valid)
    return raw, frames, valid[0] and not odd and all(t[2] for t in tensors)


def results_outcome(split: list) -> list:
    """What the master's on_replies concludes of each reply: header bytes, frames, and for a result it
    checks on its forwarding path (ok true, only REPLY_FIELDS, an int version) checked_result's answer
    with the id, or the refusal's words; None for any other reply (it goes to parse_worker_reply)."""
    out = []
    for raw, header, data, *checked in split:
        c = checked[0] if checked else None
        if c is None:
            if header.get("ok") is True and header.keys() <= REPLY_FIELDS and type(header.get("version")) is int:
                try:
                    c = (*checked_result(header, data, EPOCH, WORKER), header.get("id"))
                except ProtocolError as exc:
                    c = f"refused: {exc}"
        else:
            assert header is None
        out.append((bytes(raw), _frame_bytes(data), repr(c)))
    return out


def _results(split_fn, frames):
    try:
        return results_outcome(split_fn(frames))
    except ProtocolError as exc:
        return f"refused: {exc}"


@SETTINGS
@given(st.lists(result(), min_size=1, max_size=4), st.data())
def test_the_master_concludes_the_same_of_a_packed_reply(results, data):
    """split_results (compiled where it can) against split_replies + checked_result."""
    frames = packed_reply_frames([raw for raw, _, _ in results], [f for _, fs, _ in results for f in fs])
    frames = _frames_off(data.draw, frames)
    first = data.draw(st.sampled_from(["ok"] * 8 + ["wide", "str_item", "trunc", "empty_list", "map"]))
    if first == "wide":
        frames[0] = enc([raw for raw, _, _ in results], random.Random(data.draw(st.integers(0, 99))))
    elif first == "str_item":
        frames[0] = enc([BadStr(b"\x81\xa1a\x01"), *[raw for raw, _, _ in results]])
    elif first == "trunc":
        frames[0] = bytes(frames[0])[:-1]
    elif first == "empty_list":
        frames[0] = enc([])
    elif first == "map":
        frames[0] = results[0][0]
    want = _results(lambda f: split_replies(f), frames)
    got = _results(lambda f: split_results(f, EPOCH, WORKER), frames)
    assert got == want
    if type(got) is list:
        event(f"reply: compiled {'took it' if split_results(frames, EPOCH, WORKER)[0][3] is not None else 'left it'}")
    if (all(v for _, _, v in results) and first in ("ok", "wide") and type(want) is list
            and all(c.startswith("(") for _, _, c in want)):  # results Python takes: so does the compiled path
        assert all(c is not None for _, _, _, c in split_results(frames, EPOCH, WORKER)), frames


@SETTINGS
@given(result())
def test_one_result_header_gets_one_verdict(res):
    raw, frames, valid = res
    got = fastcheck.fast_result(raw, frames, 0, len(frames), EPOCH, WORKER)
    if valid and results_outcome([(raw, unpack_map(raw), frames)])[0][2].startswith("("):
        assert got is not None, (raw, frames)
    event(f"result: compiled {'took it' if got is not None else 'left it to Python'}")
    if got is None:
        return
    header = unpack_map(raw)
    assert header.get("ok") is True and header.keys() <= REPLY_FIELDS and type(header.get("version")) is int
    assert got[0] == request_frames({"inputs": header["outputs"]}) == len(frames)
    assert repr(got[1]) == repr((*checked_result(header, frames, EPOCH, WORKER), header.get("id")))


# ------------------------------------------------------------------ the worker's framing-2 REQUEST
@st.composite
def route(draw):
    fields = [draw(st.sampled_from(["k1", "k2", "k" * MAX_ID_LEN])), draw(st.sampled_from([1, 2, 2**63 - 1])),
              draw(st.sampled_from(["m", "m" * 128])), draw(st.none() | st.sampled_from([0, 3, 2**63 - 1])),
              draw(st.floats(-1e6, 1e6) | st.integers(-10, 10**6) | st.sampled_from([2**64 - 1, -2**63]))]
    if draw(st.integers(0, 3)) == 0:
        fields[draw(st.integers(0, 4))] = draw(ODD | st.sampled_from(
            ["", "k" * (MAX_ID_LEN + 1), "m" * 129, 0, 2**63, -1, math.nan, math.inf, -math.inf, True, 1.0]))
    return fields


def dispatch_outcome(frames) -> list | str:
    def one(d):
        arrays = d.arrays
        if arrays is None and d.error is None:
            arrays = decode_tensors(d.header["inputs"], d.frames)
        return (d.key, d.attempt, d.model, d.version, d.timeout_ms, d.header, _frame_bytes(d.frames), d.error, d.cid,
                None if arrays is None else [(k, a.dtype.str, a.shape, _content(a)) for k, a in arrays.items()])
    return [repr(one(d)) for d in frames]


def dispatch_verdict(parse, frames) -> list | str:
    """What one REQUEST parser concludes of the frames: its outcome, or its refusal's words."""
    try:
        return dispatch_outcome(parse(frames))
    except ProtocolError as exc:
        return f"refused: {exc}"


@SETTINGS
@given(st.lists(st.tuples(route(), request()), min_size=1, max_size=4), st.data())
def test_the_worker_concludes_the_same_of_a_packed_request(reqs, data):
    """parse_dispatch (compiled where it takes the REQUEST whole) against its Python path, each
    request's inputs decoded as the worker would (decode_tensors)."""
    entries = [(fields, raw, fs) for fields, (raw, fs, _) in reqs]
    rows = [[*fields, raw] for fields, raw, _ in entries]
    frames = _frames_off(data.draw, [enc(rows), *(f for _, _, fs in entries for f in fs)])
    form = data.draw(st.sampled_from(["ok"] * 8 + ["wide", "seven", "five", "str_header", "trunc"]))
    if form == "wide":
        frames[0] = enc(rows, random.Random(data.draw(st.integers(0, 99))))
    elif form == "seven":
        rows[-1].append(0)
        frames[0] = enc(rows)
    elif form == "five":  # a framing-1 entry among framing-2 ones
        rows[0] = rows[0][:5]
        frames[0] = enc(rows)
        frames.insert(1, entries[0][1])
    elif form == "str_header":
        rows[0][5] = BadStr(rows[0][5][:6]) if data.draw(st.booleans()) else "x"
        frames[0] = enc(rows)
    elif form == "trunc":
        frames[0] = bytes(frames[0])[:data.draw(st.integers(0, len(frames[0]) - 1))]
    assert dispatch_verdict(parse_dispatch, frames) == dispatch_verdict(envelope._python_dispatch, frames)
    fast = envelope._fast_dispatch(frames)
    event(f"REQUEST: compiled {'took it' if fast is not None else 'left it to Python'}")
    if fast is not None:
        assert all(d.error is None and d.arrays is not None for d in fast)
    elif (form in ("ok", "wide") and len(frames) == 1 + sum(len(fs) for _, fs, _ in entries)
          and all(v for _, (_, _, v) in reqs) and all(
              type(f[4]) in (int, float) and math.isfinite(f[4]) and type(f[1]) is int and 1 <= f[1] < 2**63
              and f[0] in ("k1", "k2", "k" * MAX_ID_LEN) and f[2] in ("m", "m" * 128)
              and (f[3] is None or type(f[3]) is int and 0 <= f[3] < 2**63) for f, _ in reqs)):
        pytest.fail("a REQUEST of the worker's own form missed the compiled path")


# ------------------------------------------------------------------ the client's packed answers
@st.composite
def answer(draw):
    """(header bytes, frames): a result as the master forwards it, an ACK, an error or a ping's answer."""
    kind = draw(st.sampled_from(["result"] * 10 + ["ack", "error", "ping"]))
    epoch = draw(st.sampled_from([EPOCH, "e2"]))
    if kind == "error":
        pairs = [("id", "r1"), ("ok", False), ("epoch", epoch), ("error", {"code": 503, "message": "busy"})]
        frames = []
    elif kind == "ping":
        pairs, frames = [("ok", True), ("epoch", epoch)], []
    elif kind == "ack":
        pairs, frames = [("id", "r1"), ("ok", True), ("ack", True), ("epoch", epoch), ("outputs", [])], []
    else:
        raw, frames, _ = draw(result())
        try:
            h = unpack_map(raw)
        except ProtocolError:
            return raw, frames
        h["id"], h["epoch"] = draw(st.sampled_from(["r1", "r2"])), epoch
        pairs = list(h.items())
    valid: list = []
    return write(draw, pairs, sorted(REPLY_FIELDS | {"ack"}), valid), frames


def answers_outcome(frames) -> list | None:
    """split_answers's tuples, or the Python path's (split_replies, then what the client reads of each
    and the client's own tensor check, for an ok answer with outputs)."""
    out = []
    for raw, rid, epoch, ack, version, worker, meta, data in frames:
        out.append(repr((bytes(raw), rid, epoch, ack, version, worker, meta, _frame_bytes(data))))
    return out


@SETTINGS
@given(st.lists(answer(), min_size=1, max_size=4), st.data())
def test_the_client_concludes_the_same_of_a_packed_answer_message(answers, data):
    """fastanswer.split_answers against split_replies + check_tensors (the client's _tensors_ok)."""
    frames = packed_reply_frames([raw for raw, _ in answers], [f for _, fs in answers for f in fs])
    frames = _frames_off(data.draw, frames)
    if data.draw(st.integers(0, 9)) == 0:
        frames[0] = enc([raw for raw, _ in answers], random.Random(data.draw(st.integers(0, 99))))
    fast = fastanswer.split_answers(frames)
    try:
        slow = split_replies(frames)
    except ProtocolError:
        slow = None
    event(f"answers: compiled {'took it' if fast is not None else 'left it to Python'}")
    if fast is None:
        return
    assert slow is not None, f"the compiled path took a message Python refuses: {frames!r}"
    want = []
    for raw, header, d in slow:
        assert header.get("ok") is True and type(header.get("id")) is str and 0 < len(header["id"]) <= MAX_ID_LEN
        check_tensors(header.get("outputs"), d)  # raises if the client's own check refuses the tensors
        want.append((raw, header["id"], header.get("epoch"), header.get("ack"), header.get("version"),
                     header.get("worker"), header.get("outputs", []), d))
    assert answers_outcome(fast) == answers_outcome(want)
    for (raw, *_), (_, header, _) in zip(fast, slow, strict=True):
        assert repr(unpack_map(raw)) == repr(header)


# ------------------------------------------------------------------ every prefix, every form
def _valid_messages():
    rnd = random.Random(11)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    big = np.zeros(5000, dtype=np.int64)  # out of line
    req = envelope.request_body("r1", {"x": a, "ids": big}, version=2, timeout_ms=50, ack=True, tags={"u": "1"})
    res_h = {"id": "r1", "key": "k1", "attempt": 1, "ok": True, "model": "m", "version": 2, "batch_rows": 1,
             "outputs": [["y", "float32", [2, 3], a.tobytes()], ["z", "int64", [5000]]], "worker": WORKER,
             "epoch": EPOCH, "timing": {"queue_ms": 0.5, "compute_ms": 1}}
    return rnd, req, res_h, big.tobytes()


def test_every_prefix_and_every_wide_form_of_a_valid_message_gets_one_verdict():
    """Deterministic sweep: each valid header cut at every byte, and written in 50 random wide forms,
    through each pair (the prefixes must all be refused by both; the wide forms all accepted by both)."""
    rnd, req, res_h, big = _valid_messages()
    raw_req, req_frames = req[0], [bytes(f) for f in req[1:]]
    header = unpack_map(raw_req)
    for cut in range(len(raw_req)):
        part = raw_req[:cut]
        assert fastcheck.decode_request(part) is None
        assert python_request(part, req_frames).startswith("refused")
    for _ in range(50):
        wide = enc(header, rnd)
        r = fastcheck.decode_request(wide)
        assert r is not None and repr(envelope.ClientRequest(*fastcheck.request_fields(r, req_frames))) == \
            python_request(wide, req_frames)
    raw_res = pack(res_h)
    for cut in range(len(raw_res)):
        part = raw_res[:cut]
        assert fastcheck.fast_result(part, [big], 0, 1, EPOCH, WORKER) is None
        frames = packed_reply_frames([part], [big])
        assert _results(lambda f: split_results(f, EPOCH, WORKER), frames) == _results(split_replies, frames)
        assert fastanswer.split_answers(frames) is None
    for _ in range(50):
        wide = enc(res_h, rnd)
        got = fastcheck.fast_result(wide, [big], 0, 1, EPOCH, WORKER)
        assert got == (1, ("k1", 1, 2, True, "r1"))
        assert fastanswer.split_answers(packed_reply_frames([wide], [big])) is not None
    route = ["k1", 1, "m", 2, 50.0]
    request_frames_ = dispatch_frames_packed([(route, raw_req, req_frames)])
    for cut in range(len(request_frames_[0])):
        frames = [request_frames_[0][:cut], *request_frames_[1:]]
        assert envelope._fast_dispatch(frames) is None
        assert dispatch_verdict(parse_dispatch, frames) == dispatch_verdict(envelope._python_dispatch, frames)
    assert envelope._fast_dispatch(request_frames_) is not None


# ------------------------------------------------------------------ codec's own fast loop (Python, same rule)
@SETTINGS
@given(st.lists(tensor(), max_size=4), st.data())
def test_codecs_fast_tensor_loops_accept_only_what_the_full_walk_accepts(tensors, data):
    """codec._fast_check / _fast_walk (the flat loops check_tensors and decode_tensors try first, on
    every path above) against _walk, which decides and words refusals: same verdict, same arrays."""
    meta = [t[0] for t in tensors]
    frames = _frames_off(data.draw, [b"", *(t[1] for t in tensors if t[1] is not None)])[1:]
    try:
        meta = unpack_map(enc({"m": meta}))["m"]  # as a peer's bytes decode
    except ProtocolError:
        return
    try:
        want = codec._walk(meta, frames, make=True)
    except ProtocolError:
        want = None
    if codec._fast_check(meta, frames):
        assert want is not None
    fast = codec._fast_walk(meta, frames, True)
    event(f"codec: fast loop {'took it' if fast is not None else 'left it to _walk'}")
    if fast is not None:
        assert want is not None and list(fast) == list(want)
        for name, a in fast.items():
            assert (a.dtype, a.shape, _content(a)) == (want[name].dtype, want[name].shape, _content(want[name]))
