"""Piece checksums: one place that says which digest a checksum is and whether bytes match it.

A checksum is text that names its own algorithm, so a manifest, a stage and a store on disk
say how each piece was hashed and an old store still loads:

- ``blake3-<64 hex>``: BLAKE3 (the `blake3` package), what publishers write since issue 22;
- ``<64 hex>`` (no prefix): sha256, what every manifest and piece file before it used.

Why BLAKE3: measured on this project's 2-core machine (105 MB in 1 MiB pieces, one thread, CPU
time) it takes 36 ms against 71 ms for hashlib's sha256 (which uses the CPU's SHA extensions
here) and 138 ms for blake2b; with the cores contended its wall time was 4x sha256's. And it is
cryptographic.
Shards and peers are not trusted, so the check must be a cryptographic hash: with a fast
non-cryptographic one (xxh3, crc) a peer could craft other bytes with the same checksum.
One thread per hash (max_threads=1): every role already runs beside others on few cores.
"""
from __future__ import annotations

import hashlib

import blake3

DEFAULT = "blake3"
ALGORITHMS = ("blake3", "sha256")
_PREFIX = {"blake3": "blake3-", "sha256": ""}
_HEX = frozenset("0123456789abcdef")


def checksum(buf, algorithm: str = DEFAULT) -> str:
    """The checksum text of `buf` (any buffer: bytes, memoryview, zmq frame buffer)."""
    if algorithm == "blake3":
        return "blake3-" + blake3.blake3(buf).hexdigest()
    if algorithm == "sha256":
        return hashlib.sha256(buf).hexdigest()
    raise ValueError(f"unknown digest algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")


def algorithm_of(text: object) -> str | None:
    """The algorithm a checksum names; None when `text` is not a checksum of a known algorithm
    (also the only names a piece file may have: no separator, no dot)."""
    if not isinstance(text, str):
        return None
    if len(text) == 64 + 7 and text.startswith("blake3-"):
        hexpart, algorithm = text[7:], "blake3"
    elif len(text) == 64:
        hexpart, algorithm = text, "sha256"
    else:
        return None
    return algorithm if _HEX.issuperset(hexpart) else None


def is_checksum(text: object) -> bool:
    return algorithm_of(text) is not None


def checksum_matches(buf, text: str) -> bool:
    """Whether `buf` hashes to `text` with the algorithm `text` names (False when it names none)."""
    algorithm = algorithm_of(text)
    return algorithm is not None and checksum(buf, algorithm) == text


CHECKSUM_FORMS = "blake3-<64 lowercase hex> or 64 lowercase hex (sha256)"
