"""Every bound of a peer's fields, at its limit and one past it, through both checks (issue 22, review).

The compiled accept paths (protocol/fastcheck.py) copy the protocol's bounds (envelope asserts the
constants equal at import), and the hypothesis tests (tests/test_fastcheck_differential.py,
tests/test_protocol_agreement.py) draw values near them at random. This table makes sure of each
one, deterministically: a message with the field at its limit is accepted by the Python check and
taken by the compiled path with the same result; one past the limit is refused by the Python check
and never taken by the compiled path (it goes to Python, which refuses it). The limits are the ones
docs/protocol.md states (ids 1..128 characters, model names up to 128, tags at most 16 of <= 256
characters, integers up to 2**63 - 1, timing at most 8 names of 1..32 characters to 0..1e9 ms).
"""
from __future__ import annotations

import pytest

from ringserve.protocol import envelope, fastcheck
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.envelope import (
    MAX_ID_LEN, MAX_INT, MAX_NAME_LEN, MAX_TAG_LEN, MAX_TAGS, MAX_TIMING, MAX_TIMING_KEY, MAX_TIMING_MS,
    checked_result, parse_dispatch, parse_request_header,
)
from ringserve.protocol.messages import ProtocolError

pytestmark = pytest.mark.timeout(60)

EPOCH, WORKER = "e1", "w1"
X = ["x", "float32", [1], b"\0\0\x80?"]  # one inline float32 tensor


def _tags(n: int, klen: int = 1, vlen: int = 1) -> dict:
    return {f"{i:0{klen}d}"[:klen] if klen else "": "v" * vlen for i in range(n)}


# (field, a value at the limit, a value one past it) of a client's request header
REQUEST_BOUNDS = [
    ("id", "r" * MAX_ID_LEN, "r" * (MAX_ID_LEN + 1)),
    ("id", "é" * MAX_ID_LEN, "é" * (MAX_ID_LEN + 1)),  # characters, not bytes
    ("id", "r", ""),
    ("version", 0, -1),
    ("tags", {f"k{i}": "" for i in range(MAX_TAGS)}, {f"k{i}": "" for i in range(MAX_TAGS + 1)}),
    ("tags", {"k" * MAX_TAG_LEN: "v"}, {"k" * (MAX_TAG_LEN + 1): "v"}),
    ("tags", {"k": "v" * MAX_TAG_LEN}, {"k": "v" * (MAX_TAG_LEN + 1)}),
]


def _python_request(header: dict) -> str:
    try:
        return repr(parse_request_header(unpack_map(pack(header)), []))
    except ProtocolError as exc:
        return f"refused: {exc}"


def _compiled_request(header: dict) -> str | None:
    """The compiled path's outcome, or None where it leaves the header to Python."""
    r = fastcheck.decode_request(pack(header))
    if r is None:
        return None
    got = fastcheck.request_fields(r, [])
    return None if got is None else repr(envelope.ClientRequest(*got))


@pytest.mark.parametrize("field, at, past", REQUEST_BOUNDS, ids=lambda v: repr(v)[:24])
def test_a_request_field_at_its_limit_is_taken_and_one_past_is_refused(field, at, past):
    base = {"id": "r1", "inputs": [X]}
    good, bad = {**base, field: at}, {**base, field: past}
    want = _python_request(good)
    assert not want.startswith("refused"), want
    assert _compiled_request(good) == want  # the compiled path takes it, and reads it the same
    assert _compiled_request(bad) is None  # never taken: Python decides
    assert _python_request(bad).startswith("refused"), (field, past)


@pytest.mark.parametrize("version", [MAX_INT, MAX_INT + 1, 2**64 - 1])
def test_a_request_version_has_no_upper_bound_but_both_checks_read_it_alike(version):
    """A client's pin is only checked non-negative (it then matches no version the master knows:
    UNKNOWN_VERSION); the master's REQUEST to a worker bounds it (ROUTE_BOUNDS)."""
    h = {"id": "r1", "inputs": [X], "version": version}
    assert _compiled_request(h) == _python_request(h)


# (field, at the limit, one past) of a worker's result header, as the master checks it
RESULT_BOUNDS = [
    ("key", "k" * MAX_ID_LEN, "k" * (MAX_ID_LEN + 1)),
    ("attempt", MAX_INT, MAX_INT + 1),
    ("attempt", 1, 0),
]
# fields that only decide whether a result may be forwarded byte for byte (`passes`)
PASS_BOUNDS = [
    ("model", "m" * MAX_NAME_LEN, "m" * (MAX_NAME_LEN + 1)),
    ("timing", {f"t{i}": 1.0 for i in range(MAX_TIMING)}, {f"t{i}": 1.0 for i in range(MAX_TIMING + 1)}),
    ("timing", {"q" * MAX_TIMING_KEY: 1.0}, {"q" * (MAX_TIMING_KEY + 1): 1.0}),
    ("timing", {"queue_ms": MAX_TIMING_MS}, {"queue_ms": MAX_TIMING_MS * (1 + 1e-9)}),
    ("timing", {"queue_ms": 0.0}, {"queue_ms": -1e-9}),
]


def _result(**fields) -> dict:
    return {"id": "c1", "key": "k1", "attempt": 1, "ok": True, "model": "m", "version": 3, "batch_rows": 1,
            "outputs": [X], "worker": WORKER, "epoch": EPOCH, "timing": {"queue_ms": 0.5}, **fields}


def _python_result(h: dict):
    try:
        return (*checked_result(unpack_map(pack(h)), [], EPOCH, WORKER), h.get("id"))
    except ProtocolError as exc:
        return f"refused: {exc}"


def _compiled_result(h: dict):
    got = fastcheck.fast_result(pack(h), [], 0, 0, EPOCH, WORKER)
    return None if got is None else got[1]


@pytest.mark.parametrize("field, at, past", RESULT_BOUNDS, ids=lambda v: repr(v)[:24])
def test_a_result_field_at_its_limit_is_taken_and_one_past_is_refused(field, at, past):
    want = _python_result(_result(**{field: at}))
    assert type(want) is tuple and want[3] is True, want
    assert repr(_compiled_result(_result(**{field: at}))) == repr(want)
    assert _compiled_result(_result(**{field: past})) is None
    assert str(_python_result(_result(**{field: past}))).startswith("refused")


@pytest.mark.parametrize("field, at, past", PASS_BOUNDS, ids=lambda v: repr(v)[:24])
def test_a_result_field_past_its_limit_is_never_forwarded_byte_for_byte(field, at, past):
    """model and timing do not fail a result; past their bounds the master re-packs it (passes False)."""
    want = _python_result(_result(**{field: at}))
    assert type(want) is tuple and want[3] is True, want
    assert repr(_compiled_result(_result(**{field: at}))) == repr(want)
    over = _python_result(_result(**{field: past}))
    assert type(over) is tuple and over[3] is False, over
    compiled = _compiled_result(_result(**{field: past}))
    assert compiled is None or repr(compiled) == repr(over)  # taken only with the same verdict


# (index in the routing entry, at the limit, one past) of a master's framing-2 REQUEST to a worker
ROUTE_BOUNDS = [
    (0, "k" * MAX_ID_LEN, "k" * (MAX_ID_LEN + 1)),
    (1, MAX_INT, MAX_INT + 1),
    (1, 1, 0),
    (2, "m" * MAX_NAME_LEN, "m" * (MAX_NAME_LEN + 1)),
    (3, MAX_INT, MAX_INT + 1),
    (3, 0, -1),
]


def _dispatch(entry: list) -> tuple[list, bool]:
    """(each request's (key, error or None), whether the compiled path took the REQUEST whole)."""
    frames = [pack([entry])]
    fast = envelope._fast_dispatch(frames)
    ds = parse_dispatch(frames)
    return [(d.key, d.error) for d in ds], fast is not None


@pytest.mark.parametrize("index, at, past", ROUTE_BOUNDS, ids=lambda v: repr(v)[:24])
def test_a_routing_field_at_its_limit_is_taken_and_one_past_is_refused(index, at, past):
    header = pack({"id": "r1", "inputs": [X]})
    entry = ["k1", 1, "m", None, 1000.0, header]
    good, bad = list(entry), list(entry)
    good[index], bad[index] = at, past
    got, fast = _dispatch(good)
    assert fast and len(got) == 1 and got[0][1] is None, got
    python = envelope._python_dispatch([pack([good])])
    assert [(d.key, d.error) for d in python] == got
    try:
        bad_got, bad_fast = _dispatch(bad)
    except ProtocolError:
        return  # the whole REQUEST refused: nothing taken
    assert not bad_fast
    assert all(err is not None for _, err in bad_got) or not bad_got, bad_got
