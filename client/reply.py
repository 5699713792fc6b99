"""A result as the client hands it over, with its outputs made into arrays only when first read.

Every answer's tensors are checked when it arrives (``codec.check_tensors``: names, dtypes, shapes
against the bytes, the same checks ``decode_tensors`` makes), and an answer that fails is dropped
there, before its request counts as answered. Making the numpy views is half of decoding an
answer, and a caller that only wants to know a request succeeded (a load generator, a health check)
never needs them, so ``Reply.outputs`` makes them on first read from the checked list and keeps
them: a caller that reads every answer pays what it paid before, one that does not pays half.
``Reply.raw`` hands over that checked list and its frames for a caller that only forwards the
bytes (the gateway writes them into its HTTP answer without making arrays). The same holds for
``Reply.header``: an answer the compiled path (protocol/fastanswer.py) took keeps its header's
bytes, and the map is unpacked from them on first read (most callers never read it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ringserve.protocol.codec import SUPPORTED_DTYPES, decode_tensors, unpack_map

_DTYPES = {name: np.dtype(name) for name in SUPPORTED_DTYPES}


def checked_arrays(meta: list, frames: Sequence) -> dict[str, np.ndarray]:
    """Views of the tensors a list that ``check_tensors`` accepted describes (so no check is made
    again); string tensors go to the codec's own decoder, which makes their objects."""
    out: dict[str, np.ndarray] = {}
    k = 0
    for entry in meta:
        if len(entry) == 4:
            buf = entry[3]
        else:
            buf = frames[k]
            k += 1
        dtype = _DTYPES.get(entry[1])
        if dtype is None:  # "bytes", the only other name a checked list may hold: strings are objects
            return decode_tensors(meta, frames)
        shape = entry[2]
        out[entry[0]] = np.frombuffer(buf, dtype=dtype).reshape(shape) if len(buf) else np.zeros(shape, dtype)
    return out


class Reply:
    """A successful answer: its id, outputs (name -> numpy array), the version and worker that
    computed it, and the header as the master sent it."""

    __slots__ = ("id", "version", "worker", "_header", "_raw", "_outputs", "_meta", "_frames")

    def __init__(self, id: str, outputs: dict[str, np.ndarray] | None, version: int | None, worker: str | None,
                 header: dict | None, meta: list | None = None, frames: Sequence = (), raw: bytes | None = None):
        self.id, self.version, self.worker = id, version, worker
        self._header, self._raw = header, raw  # header None: unpacked from raw (accepted already) when first read
        self._outputs = outputs  # None: made from meta and frames (checked already) when first read
        self._meta, self._frames = meta, frames

    @property
    def header(self) -> dict:
        """The answer's header map as the master sent it (made from its bytes on first read when the
        compiled path, protocol/fastanswer.py, took the answer without making it)."""
        h = self._header
        if h is None:
            h = self._header = unpack_map(self._raw) if self._raw is not None else {}
            self._raw = None
        return h

    @property
    def outputs(self) -> dict[str, np.ndarray]:
        out = self._outputs
        if out is None:
            out = self._outputs = checked_arrays(self._meta or [], self._frames)
            self._meta, self._frames = None, ()
        return out

    @property
    def raw(self) -> tuple[list, Sequence] | None:
        """The answer's tensors as they arrived, checked and not made into arrays: ``(meta, frames)``,
        where each meta entry is ``[name, dtype, shape]`` (its bytes the next of `frames`, in order) or
        ``[name, dtype, shape, bytes]`` (inline). For a caller that forwards the bytes (the gateway's
        binary answers) and so never needs the arrays; None once ``outputs`` was read or when the
        answer came decoded already (read ``outputs`` then). Read-only: the lists are the reply's."""
        if self._outputs is not None or self._meta is None:
            return None
        return self._meta, self._frames

    def __repr__(self) -> str:
        return f"Reply(id={self.id!r}, version={self.version!r}, worker={self.worker!r}, outputs={self.outputs!r})"
