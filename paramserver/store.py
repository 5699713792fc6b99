"""Durable storage of one shard's slices: one safetensors file + one manifest per version.

Write path: serialize, write to a temporary name, fsync, rename, fsync the directory, so a
SIGKILL at any moment leaves either the old state or the new one. The manifest holds the
sha256 of the file and of every piece, the version's content digest (what a second publisher
of the same version number is compared with), and `meta_sha256`, a checksum of the manifest
itself; anything that does not match, or cannot be read at all, is marked corrupt and never
served, and the shard still starts. `current.json` keeps the history of current versions, so
a corrupt current version falls back to the one that was current before it (recorded in
`fallback`), never to a newer one that may have been rolled back on purpose.
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

HISTORY = 16  # earlier current versions remembered per model (for falling back)


def meta_checksum(manifest: dict) -> str:
    """sha256 of the manifest's own content (every field but meta_sha256), canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "meta_sha256"}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def sha256(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


@dataclass
class Slice:
    """The pieces of one model version held by this shard (flat arrays) and their checksums."""

    version: int
    pieces: dict[str, Piece] = field(default_factory=dict)
    data: dict[str, np.ndarray] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    digest: str = ""  # the publisher's content digest of the whole version

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.data.values())


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


def fallback_version(corrupt: int, history: list[int], good: set[int]) -> int | None:
    """The version to serve when `corrupt` (the current one) cannot be read: the latest earlier
    current version that is older than it and readable. Never a newer one: a newer version in
    the history was current before a rollback, i.e. rolled back on purpose."""
    return next((v for v in reversed(history) if v < corrupt and v in good), None)


class ShardStore:
    def __init__(self, root: str | os.PathLike, keep: int = 3):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.slices: dict[str, dict[int, Slice]] = {}  # model -> version -> slice
        self.current: dict[str, int] = {}
        self.history: dict[str, list[int]] = {}  # model -> earlier current versions, oldest first
        self.corrupt: dict[str, dict[int, str]] = {}
        self.fallback: dict[str, dict] = {}  # model -> {"from", "to", "why"} when a corrupt current was replaced

    # --------------------------------------------------------------- writing
    def commit(self, model: str, sl: Slice) -> None:
        d = self.root / model
        d.mkdir(parents=True, exist_ok=True)
        payload = st_save({k: np.ascontiguousarray(v) for k, v in sl.data.items()}) if sl.data else b""
        manifest = {"model": model, "version": sl.version, "file_sha256": sha256(payload), "digest": sl.digest,
                    "pieces": [[*p.as_list(), sl.checksums[k]] for k, p in sl.pieces.items()]}
        manifest["meta_sha256"] = meta_checksum(manifest)
        _atomic_write(d / f"v{sl.version}.safetensors", payload)
        _atomic_write(d / f"v{sl.version}.manifest.json", json.dumps(manifest).encode())  # last: marks it done
        self.slices.setdefault(model, {})[sl.version] = sl
        self.corrupt.get(model, {}).pop(sl.version, None)
        self.set_current(model, sl.version)
        self._prune(model)

    def set_current(self, model: str, version: int | None, remember: bool = True) -> None:
        """Make `version` current (None: no current version); the old one goes to the history."""
        old = self.current.get(model)
        hist = self.history.setdefault(model, [])
        if remember and old is not None and old != version:
            hist.append(old)
            del hist[:-HISTORY]
        if version is None:
            self.current.pop(model, None)
        else:
            self.current[model] = version
        self.fallback.pop(model, None)
        _atomic_write(self.root / model / "current.json", json.dumps({"version": version, "history": hist}).encode())

    def revert(self, model: str, version: int, previous: int | None) -> None:
        """Undo a commit of `version` (a publish that failed elsewhere): `previous` current again,
        `version` forgotten, so every shard agrees on what exists."""
        if self.current.get(model) == version:
            hist = self.history.get(model, [])
            if hist and hist[-1] == previous:
                hist.pop()
            self.set_current(model, previous, remember=False)
        self.slices.get(model, {}).pop(version, None)
        for suffix in (".manifest.json", ".safetensors"):
            (self.root / model / f"v{version}{suffix}").unlink(missing_ok=True)

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
        """Read every committed version back from disk; mark (and remember) what cannot be read as
        corrupt. Never raises for what is on disk: a shard always starts on its data dir."""
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                self._load_model(d)
            except Exception as exc:  # noqa: BLE001 - whatever is on disk, the shard starts
                log.error("model_unreadable", model=d.name, error=f"{type(exc).__name__}: {exc}")

    def _load_model(self, d: Path) -> None:
        model = d.name
        for mf in sorted(d.glob("v*.manifest.json")):
            try:
                version = int(mf.name[1:].split(".")[0])
            except ValueError:
                log.warning("stray_file_ignored", model=model, file=mf.name)
                continue
            try:
                self.slices.setdefault(model, {})[version] = self._read(d, version, mf)
            except Exception as exc:  # noqa: BLE001 - a version we cannot read is corrupt, not fatal
                why = (str(exc) if isinstance(exc, CorruptVersion)
                       else f"v{version}: unreadable ({type(exc).__name__}: {exc})")
                self.corrupt.setdefault(model, {})[version] = why
                log.error("version_corrupt_refused", model=model, version=version, error=why)
        good = set(self.slices.get(model, {}))
        wanted, hist = None, []
        try:
            cur = json.loads((d / "current.json").read_text())
            wanted = cur.get("version") if isinstance(cur.get("version"), int) else None
            hist = [v for v in cur.get("history", []) if isinstance(v, int)][-HISTORY:]
        except (OSError, ValueError, AttributeError) as exc:
            if (d / "current.json").exists():
                log.error("current_unreadable", model=model, error=str(exc))
        self.history[model] = hist
        if wanted in good:
            self.current[model] = wanted
        elif wanted is not None:  # the current version is corrupt: go back to what was current before it
            back = fallback_version(wanted, hist, good)
            why = self.corrupt.get(model, {}).get(wanted, f"v{wanted} missing")
            self.fallback[model] = {"from": wanted, "to": back, "why": why}
            if back is not None:
                self.current[model] = back
                del hist[max(i for i, v in enumerate(hist) if v == back):]
            log.error("current_version_corrupt_fell_back", model=model, version=wanted, now=back, why=why)
        log.info("model_loaded_from_disk", model=model, versions=sorted(good), current=self.current.get(model))

    def _read(self, d: Path, version: int, mf: Path) -> Slice:
        try:
            manifest = json.loads(mf.read_text())
            payload = (d / f"v{version}.safetensors").read_bytes()
        except (OSError, ValueError) as exc:
            raise CorruptVersion(f"v{version}: unreadable ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("meta_sha256") != meta_checksum(manifest):
            raise CorruptVersion(f"v{version}: manifest fails its own checksum (torn or edited)")
        if sha256(payload) != manifest.get("file_sha256"):
            raise CorruptVersion(f"v{version}: checksum mismatch for v{version}.safetensors (torn or corrupt file)")
        arrays = st_load(payload) if payload else {}
        sl = Slice(version, digest=str(manifest.get("digest", "")))
        for item in manifest["pieces"]:
            piece, checksum = Piece.from_list(item[:6]), item[6]
            arr = arrays.get(piece.key)
            if arr is None or sha256(arr.tobytes()) != checksum:
                raise CorruptVersion(f"v{version}: piece {piece.key} missing or failing its checksum")
            sl.pieces[piece.key], sl.data[piece.key], sl.checksums[piece.key] = piece, arr, checksum
        return sl

    def versions(self) -> dict[str, list[int]]:
        return {m: sorted(v) for m, v in self.slices.items()}
