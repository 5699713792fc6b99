"""String tensors (dtype "bytes"): the codec's layout and bounds, and BYTES through real clients,
master and worker (both clients; empty strings, non-UTF-8 bytes, 1 MB strings; batched)."""
from __future__ import annotations

import asyncio
import textwrap

import numpy as np
import pytest

from ringserve.protocol.codec import (
    BYTES, INLINE_MAX, MAX_STRINGS, check_tensors, decode_tensors, encode_tensors, frame_count,
)
from ringserve.protocol.envelope import clean_timing, forwardable, parse_worker_reply, timing_ok
from ringserve.protocol.messages import ProtocolError

pytestmark = pytest.mark.timeout(120)

ODD = [b"", b"\xff\xfe\x00", "h\u00e9llo \u4e2d".encode(), b"\x00" * 3, b"x" * (1 << 20)]


def buf(items: list[bytes]) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in items)


def roundtrip(value, inline_max: int = INLINE_MAX) -> np.ndarray:
    meta, frames = encode_tensors({"t": value}, inline_max)
    check_tensors(meta, frames)
    assert frame_count(meta) == len(frames)
    return decode_tensors(meta, frames)["t"]


def test_layout_is_four_byte_little_endian_lengths_then_bytes():
    meta, frames = encode_tensors({"t": np.array([b"ab", b""], dtype=object)})
    assert meta == [["t", BYTES, [2], b"\x02\x00\x00\x00ab\x00\x00\x00\x00"]] and frames == []


@pytest.mark.parametrize("value, want", [
    (np.array(ODD, dtype=object), ODD),
    (["a", "\u00e9"], [b"a", "\u00e9".encode()]),  # str travels as UTF-8
    ([[b"a", b"bb"], [b"", b"c"]], [b"a", b"bb", b"", b"c"]),
    (np.array(["x", "yz"]), [b"x", b"yz"]),  # numpy U
    (np.array([b"x", b"yz"]), [b"x", b"yz"]),  # numpy S
    (b"one", [b"one"]),  # a scalar: shape []
])
def test_strings_round_trip_exactly(value, want):
    out = roundtrip(value)
    assert out.dtype == object and out.shape == np.shape(np.array(value, dtype=object))
    assert out.ravel().tolist() == want


def test_large_string_tensors_travel_in_a_frame_small_ones_inline():
    meta, frames = encode_tensors({"big": [b"x" * 20000], "small": [b"x"]})
    assert [len(m) for m in meta] == [3, 4] and len(frames) == 1
    assert roundtrip([b"x" * 20000], inline_max=0).tolist() == [b"x" * 20000]


@pytest.mark.parametrize("data, shape, why", [
    (buf([b"ab"])[:-1], [1], "beyond the buffer's end"),
    (buf([b"ab"]) + b"\0", [1], "bytes after"),
    (buf([b"ab"]), [2], "cannot hold"),
    (buf([b"a", b"b"]), [1], "bytes after"),
    (b"\xff\xff\xff\xff" + b"a" * 8, [2], "beyond the buffer's end"),
    (b"ab", [1], "cannot hold"),
    (b"", [0, 3], None),
    (b"x", [0], "bytes after"),
])
def test_the_master_check_validates_the_layout_fully(data, shape, why):
    for meta, frames in ([["t", BYTES, shape, data]], []), ([["t", BYTES, shape]], [data]):
        if why is None:
            check_tensors(meta, frames)
            assert decode_tensors(meta, frames)["t"].shape == tuple(shape)
            continue
        with pytest.raises(ProtocolError, match=why):
            check_tensors(meta, frames)
        with pytest.raises(ProtocolError, match=why):
            decode_tensors(meta, frames)


def test_string_tensors_are_bounded_and_typed():
    with pytest.raises(ProtocolError, match="more than"):
        check_tensors([["t", BYTES, [MAX_STRINGS + 1]]], [b"\0" * 4 * (MAX_STRINGS + 1)])
    with pytest.raises(ProtocolError, match="more than"):
        encode_tensors({"t": [b""] * (MAX_STRINGS + 1)})
    with pytest.raises(ProtocolError, match="must be bytes or str"):
        encode_tensors({"t": np.array([b"a", 3], dtype=object)})
    with pytest.raises(ProtocolError, match="bytes or str, got list"):  # a ragged nested list
        encode_tensors({"t": [[b"a"], [b"b", b"c"]]})


def test_reply_timing_is_forwarded_only_when_clean_and_kept_checked_when_repacked():
    good = {"id": "c", "key": "k", "attempt": 1, "ok": True, "version": 0, "outputs": [], "worker": "w",
            "epoch": "e", "timing": {"queue_ms": 0.5, "compute_ms": 2}}
    assert forwardable(good, "e", "w", "c")
    bad = {**good, "timing": {"queue_ms": float("nan"), "x" * 40: 1.0, "compute_ms": -1, "ok_ms": 3.0, 5: 1}}
    assert not forwardable(bad, "e", "w", "c") and not timing_ok(bad["timing"])
    assert not forwardable({**good, "timing": "fast"}, "e", "w", "c")
    assert not forwardable({**good, "timing": {f"k{i}": 1 for i in range(9)}}, "e", "w", "c")
    assert parse_worker_reply(bad, []).header["timing"] == {"ok_ms": 3.0}
    assert "timing" not in parse_worker_reply({**good, "timing": [1]}, []).header
    assert clean_timing({"a": True}) is None


# ---------------------------------------------------------------- end to end
ECHO = textwrap.dedent('''
    import numpy as np
    import torch


    class Strings(torch.nn.Module):
        """Takes a bytes tensor (a numpy object array) and answers it back with each string's length."""

        def forward(self, text):
            lengths = torch.tensor([len(s) for s in text.ravel()], dtype=torch.int64).reshape(text.shape)
            return {"text": np.array([s[::-1] for s in text.ravel()], dtype=object).reshape(text.shape),
                    "lengths": lengths}


    def strings():
        return Strings()
''')


@pytest.fixture
def strings_model(tmp_path, monkeypatch):
    (tmp_path / "strmodels.py").write_text(ECHO)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "s=strmodels:strings"


def test_bytes_round_trip_through_both_clients_and_batches(cluster, strings_model):
    from ringserve.client import AsyncClient, Client

    cluster.start_master()
    cluster.start_workers(1, "--max-queue-delay-us", "20000", model=strings_model)
    sent = np.array(ODD, dtype=object)
    with Client(cluster.frontend, timeout=30) as c:
        out = c.infer("s", {"text": sent})
        assert out["text"].tolist() == [s[::-1] for s in ODD]
        assert out["lengths"].tolist() == [len(s) for s in ODD]
        futures = [c.infer_async("s", {"text": [f"r{k}".encode() * k, b"\xff"]}) for k in range(12)]
        replies = [f.result(timeout=30) for f in futures]
    for k, r in enumerate(replies):
        assert r.outputs["text"].tolist() == [(f"r{k}".encode() * k)[::-1], b"\xff"]
        assert set(r.header["timing"]) >= {"queue_ms", "compute_ms"}
    assert max(r.header["batch_rows"] for r in replies) > 2  # BYTES inputs concatenated along dim 0

    async def main():
        async with AsyncClient(cluster.frontend, timeout=30) as ac:
            return await ac.infer("s", {"text": sent.reshape(1, -1)})

    out = asyncio.run(main())
    assert out["text"].shape == (1, len(ODD)) and out["text"].ravel().tolist() == [s[::-1] for s in ODD]
