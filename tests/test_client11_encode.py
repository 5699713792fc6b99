"""The headers our own code packs with msgspec (protocol/envelope.py: `pack_header`, `packed_frames`)
are the bytes codec.pack wrote for them: a peer cannot tell which encoder made a message.

Random request headers (request_header's own maps: inline and out-of-line tensors of every dtype,
versions, timeouts as floats, tags, an ACK) and random row lists of the shapes a packed message
carries (a client's [service, header], a master's header bytes, a REQUEST's fields then the header),
with ints at every msgpack width boundary, are packed both ways and compared byte for byte; and a
request made through `new_pending` carries exactly `pack(header)` as its first send.
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ringserve.client.reliable import new_pending
from ringserve.protocol.codec import SUPPORTED_DTYPES, encode_tensors, pack
from ringserve.protocol.envelope import pack_header, packed_frames, request_header

_EDGES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
          -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]
ints = st.one_of(st.sampled_from(_EDGES), st.integers(-2**63, 2**64 - 1))
floats = st.floats(allow_nan=True, allow_infinity=True)
names = st.text(min_size=1, max_size=40)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=300), st.binary(max_size=70_000))


@st.composite
def inputs(draw):
    out = {}
    for name in draw(st.lists(names, min_size=1, max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(d for d in SUPPORTED_DTYPES if d != "bytes")))
        shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
        out[name] = np.zeros(shape, dtype=dtype) + 1
    return out


@settings(max_examples=300, deadline=None)
@given(inputs(), st.one_of(st.none(), st.integers(0, 2**63 - 1)), st.one_of(st.none(), floats, ints),
       st.booleans(), st.one_of(st.none(), st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=4)),
       st.integers(0, 1 << 20))
def test_request_headers_pack_to_the_same_bytes(arrays, version, timeout_ms, ack, tags, inline_max):
    meta, _ = encode_tensors(arrays, inline_max)
    header = request_header("client-1", meta, version, timeout_ms, ack, tags)
    assert pack_header(header) == pack(header)


rows = st.one_of(
    st.tuples(names, st.binary(max_size=2000)).map(list),  # a client's [service, header]
    st.binary(max_size=2000),  # a master's answer header bytes
    st.lists(scalars, max_size=8).map(lambda r: [*r, b"h"]),  # a REQUEST's fields, then the header
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(rows, st.lists(st.binary(max_size=10), max_size=2)), min_size=1, max_size=40))
def test_packed_row_lists_pack_to_the_same_bytes(entries):
    frames = packed_frames(entries)
    assert frames[0] == pack([row for row, _ in entries])
    assert frames[1:] == [f for _, fs in entries for f in fs]


def test_a_new_request_sends_the_header_pack_wrote_and_a_resend_asks_for_an_ack():
    x = np.arange(256, dtype=np.float32).reshape(1, 256)
    big = np.ones((64, 1024), dtype=np.float32)  # past the inline bound: one frame of its own
    p = new_pending("c-7", "mlp", {"x": x, "big": big}, 2.5, 1.0, 0.5, 3, {"user": "u1"}, None)
    p.sends = 1
    assert p.packed_header() == pack(p.header) == pack(
        {"id": "c-7", "inputs": p.header["inputs"], "version": 3, "timeout_ms": 2500.0, "tags": {"user": "u1"}})
    assert len(p.tensors) == 1 and not math.isnan(p.header["timeout_ms"])
    p.sends = 2
    assert p.packed_header() == pack({**p.header, "ack": True})


def test_a_header_that_cannot_be_packed_raises_when_the_request_is_made():
    try:
        new_pending("c-8", "mlp", {"x": np.zeros(1, np.float32)}, 1.0, 1.0, 0.5, None, {"user": object()}, None)
    except TypeError:
        return
    raise AssertionError("an unpackable tag was accepted")


def test_an_unpackable_request_is_refused_at_submit_and_its_neighbours_go_at_once():
    """Before, the header was packed in the loop's flush: an unpackable one raised there, after the
    turn's list was taken, so the good requests queued beside it were not sent until their resend
    (retry_interval later, asking for an ACK) and the bad one waited for its deadline."""
    import asyncio

    import zmq

    from ringserve.client import AsyncClient
    from ringserve.client.reliable import MMI_BATCH_PACKED_BYTES
    from ringserve.protocol.envelope import split_batch_packed
    from ringserve.protocol.messages import MDP_CLIENT

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")

    async def main() -> list:
        async with AsyncClient(f"tcp://127.0.0.1:{port}", timeout=5, retry_interval=30) as c:
            x = np.zeros((1, 4), np.float32)
            futures = [c.submit("mlp", {"x": x}, request_id="good-1")]
            try:
                c.submit("mlp", {"x": x}, request_id="bad", tags={"user": object()})
            except TypeError:
                pass
            else:
                raise AssertionError("an unpackable tag was accepted")
            futures.append(c.submit("mlp", {"x": x}, request_id="good-2"))
            assert "bad" not in c._rel.pending
            loop, got = asyncio.get_running_loop(), []
            end = loop.time() + 5
            while len(got) < 2 and loop.time() < end:
                if router.poll(0):
                    frames = router.recv_multipart()
                    assert frames[1:3] == [b"", MDP_CLIENT]
                    if frames[3] == MMI_BATCH_PACKED_BYTES:
                        reqs, broken = split_batch_packed(frames[4:])
                        assert broken is None
                        got += [h["id"] for _, _, h, _ in reqs]
                    elif frames[3] == b"mlp":
                        from ringserve.protocol.codec import unpack_map
                        got.append(unpack_map(frames[4])["id"])
                await asyncio.sleep(0.005)
            for f in futures:
                f.cancel()
            return got

    try:
        assert asyncio.run(asyncio.wait_for(main(), 20)) == ["good-1", "good-2"]
    finally:
        router.close(0)
        ctx.term()


def test_values_only_msgpack_packs_still_pack_as_before():
    import msgpack

    rows = [["k", 1, "m", None, msgpack.Timestamp(1, 2), b"h"], [msgpack.ExtType(5, b"x"), b"h"]]
    assert packed_frames([(r, []) for r in rows])[0] == pack(rows)
