"""Compiled accept paths for the two headers the master reads per request (issue 22), with msgspec.

The master's remaining cost per request is Python-level header work: a msgpack unpack of each client
request header and each worker result header, then the checks of envelope.py (`request_frames`,
`parse_request_header` with `check_tensors`; `split_replies`, `checked_result` with `check_tensors`
and `timing_ok`). Here the header's bytes are decoded straight into typed msgspec Structs whose
constraints are those checks (string lengths, integer ranges, dtypes, shape bounds, the timing map),
in C, and only what a type cannot say (a tensor's byte count against its shape, names seen twice,
the frame count, the epoch and the worker's name) is checked after, in a few Python lines.

These functions only ever ACCEPT: each returns exactly what envelope.py's own functions return for
the same bytes, or None for anything it does not take (a field of another type, an unknown field, a
string tensor, a failed count, a byte msgspec reads differently...), and then the caller takes the
Python path, which stays the one authority on refusals and their wording. The forms accepted are
narrower than the Python checks' (every field of a known name and type, nothing else), so that
msgspec never accepts what Python refuses: tests/test_proto8_fastcheck.py feeds both the same random
headers (valid, mutated, wrong types, bool for int, NaN and inf, huge ints, extra fields, bin keys,
wrong lengths) and asserts the same verdicts and values.

The raw header bytes are never re-encoded: whatever the master forwards byte for byte stays so.

The worker reads the same client headers again inside a framing-2 REQUEST (issue 22, second pass):
`decode_routes` decodes the REQUEST's routing list (key, attempt, model, version, timeout_ms, header
bin) into typed entries, and `request_arrays` checks a decoded header's tensors and views them as
arrays in the same pass (decode_tensors' values), so envelope._fast_dispatch gives parse_dispatch's
Dispatch values without msgpack-unpacking either; it takes a REQUEST whole or not at all (then the
Python path decides every entry). tests/test_worker9_dispatch.py holds it to the Python path's
verdicts and values, and to the master's compiled verdict on the same header.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence, Union

import msgspec
import numpy as np

from ringserve.protocol.codec import MAX_DIM, MAX_DIMS, MAX_ELEMENTS, MAX_NAME, MAX_TENSORS, _ITEMSIZE

UNSET = msgspec.UNSET
_MAX_ID_LEN = 128  # envelope.MAX_ID_LEN (envelope imports this module: the values are asserted equal there)
_MAX_NAME_LEN = 128  # envelope.MAX_NAME_LEN
_MAX_INT = 2**63 - 1
_MAX_TAGS = 16
_MAX_TAG_LEN = 256
_MAX_TIMING = 8
_MAX_TIMING_KEY = 32
_MAX_TIMING_MS = 1e9

# Numeric dtypes only: a "bytes" tensor's buffer must be walked string by string (codec._walk).
_Dtype = Literal["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_ID_LEN)]
_Dim = Annotated[int, msgspec.Meta(ge=0, le=MAX_DIM)]
_Tag = Annotated[str, msgspec.Meta(max_length=_MAX_TAG_LEN)]
_TimingMs = Union[Annotated[int, msgspec.Meta(ge=0, le=int(_MAX_TIMING_MS))],
                  Annotated[float, msgspec.Meta(ge=0, le=_MAX_TIMING_MS)]]
_Timing = Annotated[dict[Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_TIMING_KEY)], _TimingMs],
                    msgspec.Meta(max_length=_MAX_TIMING)]


class _Tensor(msgspec.Struct, array_like=True, forbid_unknown_fields=True, gc=False):
    """[name, dtype, shape] or [name, dtype, shape, data as bin] (a nil fourth item is refused: bytes only;
    forbid_unknown_fields: an array_like struct would otherwise ignore a fifth item, which Python refuses)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
    dtype: _Dtype
    shape: Annotated[list[_Dim], msgspec.Meta(max_length=MAX_DIMS)]
    data: bytes = UNSET


_Tensors = Annotated[list[_Tensor], msgspec.Meta(max_length=MAX_TENSORS)]


class _Request(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A client request header in the form request_header() writes: the fields parse_request_header
    reads, nothing else (an unknown field could hold anything msgpack refuses, e.g. an int map key)."""

    id: _Id
    inputs: _Tensors
    version: Union[Annotated[int, msgspec.Meta(ge=0)], None] = None
    timeout_ms: Union[int, float, None] = None  # both kept as sent (Python keeps an int an int); > 0 checked after
    ack: Union[bool, None] = None
    tags: Union[Annotated[dict[_Tag, _Tag], msgspec.Meta(max_length=_MAX_TAGS)], None] = None


class _Result(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A worker's result header in the form checked_result passes: only REPLY_FIELDS, ok true, a
    key, an int attempt and version, outputs; the optional fields of the types forwardable accepts."""

    key: _Id
    attempt: Annotated[int, msgspec.Meta(ge=1, le=_MAX_INT)]
    ok: bool
    version: int
    outputs: _Tensors
    id: Union[str, None] = None
    model: Union[Annotated[str, msgspec.Meta(max_length=_MAX_NAME_LEN)], None] = None
    batch_rows: Union[int, None] = None
    worker: Union[str, None] = None
    epoch: Union[str, None] = None
    timing: Union[_Timing, None] = None


_REQUEST = msgspec.msgpack.Decoder(_Request)
_RESULT = msgspec.msgpack.Decoder(_Result)
_PACKED = msgspec.msgpack.Decoder(Annotated[list[bytes], msgspec.Meta(min_length=1, max_length=4096)])
_Error = (msgspec.DecodeError, msgspec.ValidationError)


def _frames_used(tensors: list) -> int:
    n = 0
    for t in tensors:
        if t.data is UNSET:
            n += 1
    return n


def tensors_end(tensors: list, frames: Sequence, k: int, end: int) -> int:
    """What check_tensors adds to the types, in one walk: each buffer's length is the shape's element
    count times the dtype's item size, the shape's element count (zeros as 1) bounded, no name twice,
    and the out-of-line buffers frames[k], frames[k + 1], ... never past `end`. Returns the index of
    the frame after the last one used (k when all are inline), or -1 where a check fails. The
    request's and the result's compiled checks use it; request_arrays (the worker) and
    fastanswer._checked_meta (the client) make the same checks in their own one walk, which also
    builds what they return (sharing this walk cost them 13-20 % more per request, measured)."""
    names = None
    for t in tensors:
        buf = t.data
        if buf is UNSET:
            if k >= end:
                return -1
            buf = frames[k]
            k += 1
        count = nonzero = 1
        for d in t.shape:
            count *= d
            nonzero *= d or 1
        if nonzero > MAX_ELEMENTS or len(buf) != count * _ITEMSIZE[t.dtype]:
            return -1
        if names is None:
            names = {t.name}
        elif t.name in names:
            return -1
        else:
            names.add(t.name)
    return k


def _as_lists(tensors: list) -> list:
    """The tensor list as msgpack decodes it (lists, the shape list shared with the Struct)."""
    return [[t.name, t.dtype, t.shape] if t.data is UNSET else [t.name, t.dtype, t.shape, t.data] for t in tensors]


def decode_request(raw: Any) -> _Request | None:
    """A client request header's bytes as a _Request when the compiled path takes them (types and
    bounds all checked), else None."""
    try:
        return _REQUEST.decode(raw)
    except _Error:
        return None


def request_fields(r: _Request, frames: Sequence) -> tuple | None:
    """(rid, inputs, version, timeout_ms, ack, tags) of a decoded request whose tensors are exactly
    `frames`: parse_request_header(unpack(raw), frames)'s fields; None where a check fails (the
    caller asks parse_request_header, which words the refusal)."""
    timeout_ms = r.timeout_ms
    if timeout_ms is not None and not timeout_ms > 0:
        return None
    tensors = r.inputs
    if tensors_end(tensors, frames, 0, len(frames)) != len(frames):
        return None
    return r.id, _as_lists(tensors), r.version, timeout_ms, bool(r.ack), r.tags


def frames_used(r: _Request) -> int:
    """request_frames(unpack(raw)) of a decoded request."""
    return _frames_used(r.inputs)


def decode_packed(frame: Any) -> list | None:
    """A framing-2 REPLY's first frame as its list of 1..4096 packed headers, or None (ask split_replies)."""
    try:
        return _PACKED.decode(frame)
    except _Error:
        return None


def fast_result(raw: Any, frames: Sequence, k: int, end: int, epoch: str,
                worker: str) -> tuple[int, tuple[str, int, int, bool, Any]] | None:
    """A result header's bytes whose tensors start at frames[k] (and may run to frames[end]) ->
    (how many frames it uses, (key, attempt, version, passes, its "id"))
    where the first four are checked_result(unpack(raw), frames used, epoch, worker)'s answer and
    the header is one on_replies would check that way (ok true, only REPLY_FIELDS, an int version);
    None for anything else."""
    try:
        r = _RESULT.decode(raw)
    except _Error:
        return None
    if r.ok is not True:
        return None
    used = tensors_end(r.outputs, frames, k, end)
    if used < 0:
        return None
    return used - k, (r.key, r.attempt, r.version, r.epoch == epoch and r.worker == worker, r.id)


# ------------------------------------------------------------------ the worker's REQUEST (issue 22)
# A framing-2 REQUEST's first frame: [[key, attempt, model, version, timeout_ms, client header bin], ...]
# (envelope.dispatch_frames_packed). `_dispatch_entry`'s checks as types: key an id, attempt an int
# in 1..2**63-1, model a name of 1..128 characters, version None or an int in 0..2**63-1, timeout_ms
# an int or a float (finiteness checked after), the header as bin; six items exactly (five is framing
# 1, whose header is a frame of its own: the Python path's).

class _Route(msgspec.Struct, array_like=True, forbid_unknown_fields=True, gc=False):
    key: _Id
    attempt: Annotated[int, msgspec.Meta(ge=1, le=_MAX_INT)]
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_NAME_LEN)]
    version: Union[Annotated[int, msgspec.Meta(ge=0, le=_MAX_INT)], None]
    timeout_ms: Union[int, float]
    header: bytes


_ROUTES = msgspec.msgpack.Decoder(Annotated[list[_Route], msgspec.Meta(min_length=1, max_length=4096)])
_DTYPES = {name: np.dtype(name) for name in _ITEMSIZE}


def decode_routes(frame: Any) -> list | None:
    """A framing-2 REQUEST's dispatch list as _Routes (1..4096 of them, each field's type and bounds
    checked, the timeout's finiteness not), or None (ask parse_dispatch's Python path)."""
    try:
        return _ROUTES.decode(frame)
    except _Error:
        return None


def request_arrays(r: _Request, frames: Sequence) -> dict | None:
    """The inputs of a decoded request whose tensors are exactly `frames`, as arrays viewing their
    bytes: decode_tensors(header["inputs"], frames) for a header parse_request_header accepts (its
    checks, request_fields's, made in the same pass); None where one fails (the caller asks the
    Python path, which words the refusal)."""
    timeout_ms = r.timeout_ms
    if timeout_ms is not None and not timeout_ms > 0:
        return None
    out: dict = {}
    k, end = 0, len(frames)
    for t in r.inputs:
        buf = t.data
        if buf is UNSET:
            if k >= end:
                return None
            buf = frames[k]
            k += 1
        shape = t.shape
        count = nonzero = 1
        for d in shape:
            count *= d
            nonzero *= d or 1
        dtype = t.dtype
        if nonzero > MAX_ELEMENTS or len(buf) != count * _ITEMSIZE[dtype] or t.name in out:
            return None
        out[t.name] = np.frombuffer(buf, dtype=_DTYPES[dtype]).reshape(shape) if count else np.zeros(shape, dtype)
    return out if k == end else None
