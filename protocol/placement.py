"""Where each parameter lives: a pure function of the shard list (consistent hashing).

A parameter is split into pieces of at most ``chunk_bytes`` (so one huge embedding spreads
over shards); each piece's key (``name`` or ``name#k``) maps to a shard name on a ketama
ring with virtual nodes (uhashring). Every role computes placement from the same shard
list, so nobody has to ask where a key lives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from uhashring import HashRing

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
VNODES = 40  # ketama default: 40 vnodes x 4 replicas = 160 points per shard


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of the flattened parameter `param`."""

    key: str
    param: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int

    def as_list(self) -> list:
        return [self.key, self.param, self.dtype, list(self.shape), self.start, self.stop]

    @classmethod
    def from_list(cls, item: Sequence) -> "Piece":
        key, param, dtype, shape, start, stop = item
        return cls(str(key), str(param), str(dtype), tuple(int(d) for d in shape), int(start), int(stop))


def parse_shards(text: str | Iterable[str]) -> dict[str, str]:
    """'ps0=tcp://h:1,ps1=tcp://h:2' (or a list of such items) -> {name: endpoint}."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = {}
    for item in items:
        name, sep, endpoint = item.strip().partition("=")
        if not sep or not name or not endpoint:
            raise ValueError(f"shard must look like NAME=ENDPOINT, got {item!r}")
        out[name] = endpoint
    return out


def ring(shard_names: Iterable[str]) -> HashRing:
    return HashRing(nodes=sorted(shard_names), hash_fn="ketama", vnodes=VNODES)


def split(param: str, dtype: str, shape: Sequence[int], itemsize: int,
          chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Piece]:
    numel = math.prod(shape)
    per = max(1, chunk_bytes // max(itemsize, 1))
    if numel <= per:
        return [Piece(param, param, dtype, tuple(shape), 0, numel)]
    return [Piece(f"{param}#{k}", param, dtype, tuple(shape), s, min(s + per, numel))
            for k, s in enumerate(range(0, numel, per))]


def plan(params: Mapping[str, tuple[str, Sequence[int], int]], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Piece]:
    """{name: (dtype, shape, itemsize)} -> every piece, in a stable order."""
    return [p for name in sorted(params) for p in split(name, *params[name], chunk_bytes=chunk_bytes)]


def place(pieces: Iterable[Piece], shard_names: Iterable[str]) -> dict[str, list[Piece]]:
    """Group pieces by the shard that owns them."""
    names = sorted(shard_names)
    r = ring(names)
    out: dict[str, list[Piece]] = {n: [] for n in names}
    for p in pieces:
        out[r.get_node(p.key)].append(p)
    return out


def owner(key: str, shard_names: Iterable[str]) -> str:
    return ring(shard_names).get_node(key)
