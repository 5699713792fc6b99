"""Durable storage of one shard's slices: one safetensors file + one manifest per version.

Write path: serialize, write to a temporary name, fsync, rename, fsync the directory, so a
SIGKILL at any moment leaves either the old state or the new one. The manifest holds the
sha256 of the file and of every piece; a file that does not match is refused, never served.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ringserve.protocol.placement import Piece

log = structlog.get_logger("ringserve.paramserver.store")


def sha256(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


@dataclass
class Slice:
    """The pieces of one model version held by this shard (flat arrays) and their checksums."""

    version: int
    pieces: dict[str, Piece] = field(default_factory=dict)
    data: dict[str, np.ndarray] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)


class CorruptVersion(Exception):
    pass


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class ShardStore:
    def __init__(self, root: str | os.PathLike, keep: int = 3):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.slices: dict[str, dict[int, Slice]] = {}  # model -> version -> slice
        self.current: dict[str, int] = {}
        self.corrupt: dict[str, dict[int, str]] = {}

    # --------------------------------------------------------------- writing
    def commit(self, model: str, sl: Slice) -> None:
        d = self.root / model
        d.mkdir(parents=True, exist_ok=True)
        payload = st_save({k: np.ascontiguousarray(v) for k, v in sl.data.items()}) if sl.data else b""
        manifest = {"model": model, "version": sl.version, "file_sha256": sha256(payload),
                    "pieces": [[*p.as_list(), sl.checksums[k]] for k, p in sl.pieces.items()]}
        _atomic_write(d / f"v{sl.version}.safetensors", payload)
        _atomic_write(d / f"v{sl.version}.manifest.json", json.dumps(manifest).encode())  # last: marks it done
        self.slices.setdefault(model, {})[sl.version] = sl
        self.corrupt.get(model, {}).pop(sl.version, None)
        self.set_current(model, sl.version)
        self._prune(model)

    def set_current(self, model: str, version: int) -> None:
        self.current[model] = version
        _atomic_write(self.root / model / "current.json", json.dumps({"version": version}).encode())

    def _prune(self, model: str) -> None:
        versions = sorted(self.slices.get(model, {}))
        for v in versions[:-self.keep] if len(versions) > self.keep else []:
            if v == self.current.get(model):
                continue
            del self.slices[model][v]
            for suffix in (".manifest.json", ".safetensors"):
                (self.root / model / f"v{v}{suffix}").unlink(missing_ok=True)

    # --------------------------------------------------------------- reading
    def load_all(self) -> None:
        """Read every committed version back from disk; refuse (and remember) corrupt ones."""
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            model = d.name
            for mf in sorted(d.glob("v*.manifest.json")):
                version = int(mf.name[1:].split(".")[0])
                try:
                    self.slices.setdefault(model, {})[version] = self._read(d, version, mf)
                except CorruptVersion as exc:
                    self.corrupt.setdefault(model, {})[version] = str(exc)
                    log.error("version_corrupt_refused", model=model, version=version, error=str(exc))
            cur = d / "current.json"
            good = sorted(self.slices.get(model, {}))
            if cur.exists() and json.loads(cur.read_text()).get("version") in good:
                self.current[model] = json.loads(cur.read_text())["version"]
            elif good:
                self.current[model] = good[-1]
            log.info("model_loaded_from_disk", model=model, versions=good, current=self.current.get(model))

    def _read(self, d: Path, version: int, mf: Path) -> Slice:
        try:
            manifest = json.loads(mf.read_text())
            payload = (d / f"v{version}.safetensors").read_bytes()
        except (OSError, ValueError) as exc:
            raise CorruptVersion(f"v{version}: unreadable ({exc})") from None
        if sha256(payload) != manifest.get("file_sha256"):
            raise CorruptVersion(f"v{version}: checksum mismatch for v{version}.safetensors (torn or corrupt file)")
        arrays = st_load(payload) if payload else {}
        sl = Slice(version)
        for item in manifest["pieces"]:
            piece, checksum = Piece.from_list(item[:6]), item[6]
            arr = arrays.get(piece.key)
            if arr is None or sha256(arr.tobytes()) != checksum:
                raise CorruptVersion(f"v{version}: piece {piece.key} missing or failing its checksum")
            sl.pieces[piece.key], sl.data[piece.key], sl.checksums[piece.key] = piece, arr, checksum
        return sl

    def versions(self) -> dict[str, list[int]]:
        return {m: sorted(v) for m, v in self.slices.items()}
