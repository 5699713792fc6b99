"""Where each parameter lives: a pure function of the shard list (consistent hashing).

A parameter is split into pieces of at most ``chunk_bytes`` (so one huge embedding spreads
over shards); each piece's key (``name`` or ``name#k``) maps to a shard name on a ketama
ring with virtual nodes (uhashring). Every role computes placement from the same shard
list, so nobody has to ask where a key lives.

Replication (issue 20): a piece's owners are the R distinct shards that follow its key on the
ring (its preference list, `owners`); the first is the one `owner` names. R defaults to 2 where
there are at least 2 shards (`default_replicas`). Every role checks at connect that a shard
uses the same R and shard list (`fingerprint`, in the shard's hello), so they never disagree
on where a piece lives.
"""
from __future__ import annotations

import hashlib
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


def default_replicas(shard_count: int) -> int:
    """Copies of each piece when --replicas is not given: 2 where there are at least 2 shards."""
    return 2 if shard_count >= 2 else 1


def replicas_problem(replicas: object, shard_count: int) -> str | None:
    """Why `replicas` cannot be used with `shard_count` shards (None if it can)."""
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        return f"--replicas must be a positive integer, got {replicas!r}"
    if replicas > max(shard_count, 1):
        return f"--replicas {replicas} is more than the {shard_count} shard(s) in the list"
    return None


def resolve_replicas(replicas: int | None, shard_count: int) -> int:
    """The replica count to use: `replicas` checked, or the default for `shard_count` shards."""
    r = default_replicas(shard_count) if replicas is None else replicas
    problem = replicas_problem(r, shard_count)
    if problem:
        raise ValueError(problem)
    return r


def quorum_problem(write_quorum: object, replicas: int) -> str | None:
    """Why `write_quorum` (owners a piece must be on for a version to commit) cannot be used."""
    if not isinstance(write_quorum, int) or isinstance(write_quorum, bool) or not 1 <= write_quorum <= replicas:
        return f"--write-quorum must be between 1 and --replicas ({replicas}), got {write_quorum!r}"
    return None


def fingerprint(shard_names: Iterable[str], replicas: int) -> str:
    """A short digest of the ring (sorted shard names) and R: two roles with the same one place
    every piece alike."""
    body = ",".join(sorted(shard_names)) + f"|r={replicas}|vnodes={VNODES}"
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def ring_problem(name: str, hello: Mapping, replicas: int, fp: str) -> str | None:
    """Why shard `name`'s hello shows another ring than ours (None if it agrees or does not say):
    every role checks this at connect."""
    theirs = hello.get("replicas")
    if theirs is not None and theirs != replicas:
        return (f"shard {name} runs with --replicas {theirs}, this role with {replicas}: give every role "
                f"the same --replicas")
    if hello.get("ring") is not None and hello.get("ring") != fp:
        return (f"shard {name} was started with another --shards list than this role's (ring fingerprint "
                f"{str(hello.get('ring'))[:16]} vs {fp}): give every role the same list")
    return None


def owners(key: str, shard_names: Iterable[str] | HashRing, replicas: int = 1) -> list[str]:
    """The R distinct shards that follow `key` on the ring, in preference order."""
    r = shard_names if isinstance(shard_names, HashRing) else ring(shard_names)
    return [n["nodename"] if isinstance(n, dict) else str(n) for n in r.range(key, size=replicas, unique=True)]


def place(pieces: Iterable[Piece], shard_names: Iterable[str] | HashRing, replicas: int = 1
          ) -> dict[str, list[Piece]]:
    """Group pieces by the shards that own them (each piece under each of its `replicas` owners).
    Given a ring already built (a publisher's), it is used as it is, not built again."""
    if isinstance(shard_names, HashRing):
        r, names = shard_names, sorted(shard_names.get_nodes())
    else:
        names = sorted(shard_names)
        r = ring(names)
    out: dict[str, list[Piece]] = {n: [] for n in names}
    for p in pieces:
        for n in owners(p.key, r, replicas):
            out[n].append(p)
    return out


def owner(key: str, shard_names: Iterable[str]) -> str:
    return ring(shard_names).get_node(key)


def min_live(shard_count: int, replicas: int) -> int:
    """Shards whose manifests together surely name every piece: with fewer than R missing, each
    piece has an owner among them."""
    return max(1, shard_count - replicas + 1)


def moved_keys(keys: Iterable[str], old_names: Iterable[str], new_names: Iterable[str], replicas: int
               ) -> dict[str, tuple[list[str], list[str]]]:
    """key -> (old owners, new owners) for each key whose owner set changes between two rings:
    what a rebalance must copy (to the new owners) and may drop (from the old ones)."""
    r_old, r_new = ring(old_names), ring(new_names)
    r_o = min(replicas, len(list(r_old.get_nodes())))
    r_n = min(replicas, len(list(r_new.get_nodes())))
    out = {}
    for k in keys:
        a, b = owners(k, r_old, r_o), owners(k, r_new, r_n)
        if set(a) != set(b):
            out[k] = (a, b)
    return out
