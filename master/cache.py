"""The response cache: answers of deterministic models, kept in the master so a hit never
reaches a worker (Triton's response cache is the model).

Opt-in per model (`cache=true` in the model's spec: only the model's author knows it is
deterministic; the master caches a model only while every worker serving it says so). The key
is (model, version, digest of the inputs): the version is the one that would serve the
request — the client's pin, the route's choice, or the single current version every worker
serves — so a publish, a rollback or a route change can never return an older version's answer;
while workers disagree on the current version (a rollout), unpinned requests are not cached.
The digest covers every input's name, dtype, shape and bytes (small inputs: their exact bytes, see
input_digest). Bounded in bytes (the keys' bytes counted), LRU.
Pure data and hashing: the broker decides when to look up and store.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

from ringserve.master.registry import reply_size
from ringserve.protocol.codec import pack

Key = tuple[str, int, bytes]


EXACT_MAX = 4096  # inputs whose msgpack form is at most this many bytes are keyed by that form itself


def input_digest(meta: list, frames: Sequence) -> bytes:
    """The inputs' part of a cache key (inputs checked already): names, dtypes, shapes and bytes, in order.

    What is keyed is the msgpack form of the tensor list with every tensor's bytes inline, so a
    tensor sent inline or in a frame of its own keys the same, and (msgpack being one encoding
    per value) two different inputs never have the same form. Up to EXACT_MAX bytes the key is that
    form itself: the dict's own hash finds it and its equality check compares every byte, so no
    collision can serve another input's answer and no cryptographic hash is paid per request (the
    cache-hit path's largest own cost, issue 22); the bytes are counted in the cache's bound. Above
    it, b"\0" + blake2b-160 of the form (a form starts 0x9_ or 0xdc, so the two kinds never meet)."""
    if not frames:
        form = pack(meta)  # with every tensor inline that is the header's own list, packed in one call
        return form if len(form) <= EXACT_MAX else b"\0" + hashlib.blake2b(form, digest_size=20).digest()
    pieces = list(_form_pieces(meta, frames))
    if sum(map(len, pieces)) <= EXACT_MAX:  # the same rule as inline: the form's length decides
        return b"".join(pieces)
    h = hashlib.blake2b(digest_size=20)
    for piece in pieces:
        h.update(piece)  # a frame's data hashed where it lies, never joined
    return b"\0" + h.digest()


def _form_pieces(meta: list, frames: Sequence):
    """The msgpack form of `meta` with each out-of-line tensor's frame inline, as consecutive pieces."""
    yield _array_head(len(meta))
    k = 0
    for entry in meta:
        if len(entry) == 4:
            yield pack(entry)
        else:  # [name, dtype, shape, data] as msgpack would write it
            data = frames[k]
            k += 1
            yield b"\x94" + pack(entry[0]) + pack(entry[1]) + pack(entry[2]) + _bin_head(len(data))
            yield data


def _array_head(n: int) -> bytes:
    return bytes([0x90 | n]) if n <= 15 else b"\xdc" + n.to_bytes(2, "big")  # MAX_TENSORS is far below 2**16


def _bin_head(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


class ResponseCache:
    """LRU of result headers (without the client's id) and their tensor frames, within `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Key, tuple[dict, list, int, object]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.stores = 0

    def get(self, key: Key) -> tuple[dict, list] | None:
        """(header, frames) of a kept answer, or None; counted as a hit or a miss."""
        item = self.lookup(key)
        return None if item is None else (item[0], item[1])

    def lookup(self, key: Key) -> tuple | None:
        """`get`, returning the whole entry: (header, frames, size, what `put` was given as `packed`)."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: Key, header: dict, frames: list, packed=None) -> None:
        """Keep an answer; `packed` is the caller's ready-to-send form of the header, if any (kept beside
        it, its second item, the packed pairs, counted in the bytes)."""
        size = reply_size(frames) + 256 + len(key[2]) + sum(len(str(v)) for v in header.values())
        if packed is not None:
            size += len(packed[1])
        if size > self.max_bytes:
            return  # bigger than the whole budget: never kept
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        self._items[key] = (header, frames, size, packed)
        self.bytes += size
        self.stores += 1
        while self.bytes > self.max_bytes and self._items:
            dropped = self._items.popitem(last=False)[1][2]
            self.bytes -= dropped
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict:
        return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evictions": self.evictions, "stores": self.stores}
