"""What the compute thread and the stage threads hand the socket thread: one message per batch.

A batch's answers travel over the inproc pipe as ``[RESULT count link, packed headers, *data
frames]`` (the first frame ``b"R<count> <link>"``: a frame less to send is a GIL hand-over less per
batch; ``read_result`` reads it), where the packed headers are exactly the first frame of a framing-2 REPLY (a msgpack
list of each answer's packed header, ``envelope.packed_reply_frames``). Why: the socket thread then
receives a few frames per batch instead of one per answer, and sends a turn's single part on to a
framing-2 master as it came, without splitting the headers out of frames and packing them again
(the profile of the batched MLP put that hand-over at a fifth of the socket thread's time).

A batch's answers share most of their header (ok, model, version, batch_rows, worker, epoch) and,
for single-row requests, the layout of their outputs: ``batch_outputs`` cuts each request's
inline outputs from one copy of each batched output, and ``joined_header`` packs only a request's
own fields, the shared ones packed once per batch (``pack_pairs``). Both were most of the compute
thread's time per request beyond the model (a dict, a split, an encode and a pack per answer).
A request's own fields are encoded by msgspec (envelope's ``pack_header``: the same msgpack bytes as
``pack`` for these types, in a third of its time), which also lets a part already encoded travel as ``msgspec.Raw``: the
timing map, which every answer of one REQUEST shares (``packed_timing``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import msgspec
import numpy as np

from ringserve.protocol.codec import BYTES, INLINE_MAX, encode_tensors, pack, pack_pairs
from ringserve.protocol.envelope import pack_header, pack_rows, packed_reply_frames

RESULT = b"R"  # [RESULT count link, packed headers, *data frames]: `count` answers for master `link`
CHANGED = b"S"  # [CHANGED]: model state changed (new version): heartbeat now


def result_frames(link: int, replies: Sequence[tuple[dict | bytes, Sequence]]) -> list:
    """[(reply header, or the header already packed, out-of-line frames)] for one master -> the
    RESULT message's frames."""
    data = [f for _, frames in replies for f in frames]
    return [b"R%d %d" % (len(replies), link),
            *packed_reply_frames([header if type(header) is bytes else pack(header) for header, _ in replies], data)]


def read_result(first: bytes) -> tuple[int, int] | None:
    """A hand-over's first frame -> (count, link) for a RESULT (``result_frames``), None for anything else."""
    if first[:1] != RESULT:
        return None
    count, link = first[1:].split(b" ")
    return int(count), int(link)


def shared_fields(fields: Mapping[str, Any], own_count: int) -> tuple[bytes, dict, int]:
    """The header fields every answer of a batch shares, packed once, for answers that add
    `own_count` fields of their own: (the map's first byte and the shared pairs, the fields, own_count)."""
    count, pairs = pack_pairs(fields)
    n = own_count + count
    return (bytes((0x80 | n,)) + pairs if n <= 15 else b""), dict(fields), own_count


def joined_header(own: Mapping[str, Any], shared: tuple[bytes, dict, int]) -> bytes:
    """pack({**own, **shared fields}) for keys that do not overlap: a msgpack map is its length and
    then its pairs in any order, so a map of at most 15 entries is one byte (0x80 | length), the
    shared pairs as packed once, and `own`'s pairs as msgspec wrote them after its own first byte.
    `own`'s values may hold ``msgspec.Raw`` (msgpack already encoded, e.g. ``packed_timing``)."""
    head, fields, own_count = shared
    if not head or len(own) != own_count:  # not a fixmap (no reply header has that many fields today), or
        return pack_header({**own, **fields})  # not the count the head was made for: encode it whole
    return head + pack_header(own)[1:]


def packed_timing(timing: Mapping[str, Any]) -> msgspec.Raw:
    """A reply's timing map encoded once, for every answer that shares it (``joined_header``'s `own`)."""
    return msgspec.Raw(pack_header(timing))


def batch_outputs(outputs: Mapping[str, Any], rows: Sequence[int], packed: bool = False) -> list | None:
    """Each request's `outputs` meta list (every tensor inline, as ``encode_tensors`` writes it for
    that request's rows), for requests of `rows` rows in order; None when the general path must
    take the batch: an output that is not a C-contiguous numeric numpy array with the batch's
    rows on dim 0, or a request's share beyond INLINE_MAX bytes (it travels in a frame).
    `packed`: each request's meta list already msgpack-encoded, as ``msgspec.Raw`` (for
    ``joined_header``): the part before each output's bytes is encoded once per row count, so a
    request costs a join of its heads and its slices, not a list of lists and their encoding."""
    total = sum(rows)
    top = max(rows)
    cut = []  # (name, dtype name, trailing shape, bytes per row, the batch's bytes)
    for name, arr in outputs.items():
        if type(arr) is not np.ndarray or arr.ndim == 0 or arr.shape[0] != total or not arr.flags.c_contiguous:
            return None
        row_bytes = arr.nbytes // total
        if top * row_bytes > INLINE_MAX:
            return None
        meta, _ = encode_tensors({name: arr[:0]})  # the dtype's wire name, by the codec's own rule
        dtname = meta[0][1]
        if dtname == BYTES or np.dtype(dtname) != arr.dtype:  # strings, or bytes the codec would convert
            return None
        cut.append((name, dtname, list(arr.shape[1:]), row_bytes, arr.tobytes()))
    if packed:
        return _packed_outputs(cut, rows)
    out, row = [], 0
    for n in rows:
        out.append([[name, dtname, [n, *tail], data[row * rb:(row + n) * rb]] for name, dtname, tail, rb, data in cut])
        row += n
    return out


def _packed_outputs(cut: list, rows: Sequence[int]) -> list[msgspec.Raw]:
    """batch_outputs(packed=True)'s lists: per request, msgpack of ``[[name, dtype, shape, bytes], ...]``."""
    heads: dict[int, list[bytes]] = {}  # row count -> each output's encoding up to its bytes
    views = [memoryview(data) for _, _, _, _, data in cut]
    out, row = [], 0
    for n in rows:
        parts = heads.get(n)
        if parts is None:
            parts = heads[n] = []
            for k, (name, dtname, tail, rb, _) in enumerate(cut):
                size = n * rb  # the bytes' own head: bin 8 or bin 16 (a share is at most INLINE_MAX)
                bin_head = bytes((0xC4, size)) if size < 0x100 else b"\xc5" + size.to_bytes(2, "big")
                head = pack_rows([name, dtname, [n, *tail], b""])[:-2] + bin_head  # [..., bin 8 of 0 bytes] less its head
                parts.append((pack_rows([None] * len(cut))[:-len(cut)] if k == 0 else b"") + head)
        if len(parts) == 1:
            out.append(msgspec.Raw(parts[0] + views[0][row * cut[0][3]:(row + n) * cut[0][3]]))
        else:
            out.append(msgspec.Raw(b"".join([x for head, view, (_, _, _, rb, _) in zip(parts, views, cut, strict=True)
                                             for x in (head, view[row * rb:(row + n) * rb])])))
        row += n
    return out
