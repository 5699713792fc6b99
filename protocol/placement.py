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

from ringserve.protocol.codec import SUPPORTED_DTYPES

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
VNODES = 40  # ketama default: 40 vnodes x 4 replicas = 160 points per shard
MAX_MODEL_NAME_BYTES = 255  # a model's name is a directory on every shard: one file name (NAME_MAX)
PIECE_DTYPES = SUPPORTED_DTYPES  # what a piece may be: what travels on the wire


def model_name_problem(name: object) -> str | None:
    """Why `name` cannot be a model's name on the shards (None if it can). The shard keeps a
    model in a directory of that name, so it must be one plain file name: the shard answers
    BAD_REQUEST with this, and the publisher checks it before it sends anything."""
    if not isinstance(name, str) or not name:
        return "a model name must be a non-empty string"
    if "/" in name or name.startswith("."):
        return f"model name {name[:80]!r} must be a plain name (no '/', not starting with '.')"
    if not name.isprintable():  # NUL and other control characters cannot be (or should not be) in a file name
        return f"model name {name[:80]!r} has a NUL or another unprintable character"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_MODEL_NAME_BYTES:
        return f"model name of {len(name.encode('utf-8', 'surrogatepass'))} bytes is longer than a file name " \
               f"allows ({MAX_MODEL_NAME_BYTES})"
    return None


def dtype_problem(dtype: object) -> str | None:
    """Why `dtype` cannot be a piece's dtype (None if it can): one of PIECE_DTYPES, as a string
    (a list or a map from a peer must be a clear refusal, not a TypeError)."""
    if not isinstance(dtype, str) or dtype not in PIECE_DTYPES:
        return f"dtype {str(dtype)[:40]!r} not supported (one of {', '.join(sorted(PIECE_DTYPES))})"
    return None


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
