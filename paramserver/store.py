"""Durable storage of one shard's slices: content-addressed pieces + one manifest per version.

Layout of ``<data-dir>/<model>/``: ``pieces/<checksum>`` holds the raw bytes of one piece, named
by its checksum, so a piece that two versions share is stored (and read, and checked) once;
``v<N>.manifest.json`` lists a version's pieces ([key, param, dtype, shape, start, stop,
checksum]; a checksum names its digest, protocol/digest.py: ``blake3-<hex>``, or bare hex for
the sha256 every store before issue 22 holds, which still loads), the version's content digest (what a second publisher of the same version number
is compared with) and `meta_sha256`, a checksum of the manifest itself; ``current.json`` keeps
the history of current versions and the current version's `epoch` (the publisher's stamp of the
commit, rollback or revert that made it current: with replicated shards, repair adopts the
current version with the highest epoch among a piece's owners, so a shard that missed a
rollback while down does not bring the old version back).

Write path: only pieces not stored yet are written (a delta writes its changed pieces plus a
small manifest), each to a temporary name, then all fsynced (unless `fsync=False`: the shard's
`--durability replicated`), renamed, then the pieces directory is fsynced. With fsync (the
default) a piece file is opened O_DIRECT and its bytes go through a page-aligned bounce buffer
of the writing thread's own (mapped once, reused: the frames a shard received are not
block-aligned), the last block zero-padded and the file cut back to its length before the
fsync: the disk reads the bytes from that buffer and no page-cache page is filled (issue 22,
sync11: the copy into fresh page-cache pages was most of the writer threads' CPU in
bench/weightsync.py). Where O_DIRECT is refused (tmpfs at open; EINVAL or a short write at the
first write: the file is written again, whole) and with `fsync=False`, a piece is written
through the page cache in one unbuffered write, its writeback started at once (so the disk
works on every piece of a stage while the next ones are written), and, when fsynced, its pages
dropped from the page cache once its fsync made them clean (the shard serves the copies it
holds in memory and reads a piece file again only at a restart). Durability rests on the same
fsyncs either way. O_DIRECT pieces of one call are written and fsynced in IO_LANES lanes at
once (the calling thread and a small pool of the store's own), since each such write waits for
the disk: every lane's pieces are fsynced before any rename, as before. Each thread that writes
keeps its bounce buffer (BOUNCE_BYTES, 4 MiB) for good: 16 MiB for a shard's four lanes. The shard does this
when a stage arrives, on a writer thread (`write_files` touches no books; `note_written`, on
the shard's loop, books them), so the disk works while the other shards receive theirs and
workers fetch the stage, and a commit is quick; a commit writes whatever is still missing, then the
manifest the same way (last: it marks the version done), so a SIGKILL at any moment leaves
either the old state or the new one; pieces no manifest names are invisible. The writer thread
also writes and fsyncs the stage's manifest under a temporary name (`write_stage` does both: the
manifest is written before the pieces' fsyncs, its writeback started, and fsynced after their
renames, so the disk takes it with the pieces rather than after them), so
a commit renames it into place and writes current.json, one directory fsync making both renames
durable (two waits for the disk instead of four; a crash between the renames leaves the version
committed but not current, or, on a file system that reorders renames, current naming a version
without its manifest: the start then falls back to the version current before, as for any
corrupt current version). After a
commit (the shard runs it once the commit is answered and announced: `commit(prune=False)`,
then `prune`), versions beyond `keep` are dropped, except the current one and the one current before
it (a revert of that commit, or a rollback repairing it, needs it: `prunable`); after a commit,
rollback, revert, abort or expired stage, piece files that neither a kept version nor a live
stage references are deleted (temporary files a crash left behind go at start). The prune also
maps (`demote`, read-only) the piece files of pieces that only superseded kept versions
reference, so their received buffers are freed: a shard's memory holds its current version and
live stages, not `keep` versions, and the next stage's frames reuse the freed memory rather than
fresh pages (issue 22, sync13); fetches, repair and deltas read a mapped piece like any other.

Read path (start): every piece a manifest names is read once and checked against its name (then
held in memory for the current version, mapped from its file for the others: `demote`);
a version with a manifest that fails its own checksum, a piece missing or failing its
checksum, or anything unreadable is marked corrupt and never served, and the shard still
starts. A corrupt current version falls back to the one that was current before it (recorded
in `fallback`), never to a newer one that may have been rolled back on purpose. Data dirs
written by the earlier format (one ``v<N>.safetensors`` per version, `file_sha256` in its
manifest) are still read; new commits use pieces.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
from safetensors.numpy import load as st_load

from ringserve.protocol import digest as piece_digest
from ringserve.protocol.digest import CHECKSUM_FORMS, checksum_matches
from ringserve.protocol.placement import Piece

log = structlog.get_logger("ringserve.paramserver.store")

HISTORY = 16  # earlier current versions remembered per model (for falling back)
PIECES = "pieces"  # sub-directory of a model's directory holding the content-addressed pieces
FORMAT = 2  # manifest format: 2 = content-addressed pieces (1, no "format" field: one safetensors file)


def meta_checksum(manifest: dict) -> str:
    """sha256 of the manifest's own content (every field but meta_sha256), canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "meta_sha256"}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def sha256(buf) -> str:
    """sha256 of small things (a manifest's own checksum, the earlier single-file format)."""
    return hashlib.sha256(buf).hexdigest()


def is_checksum(text: object) -> bool:
    """A piece checksum of a known digest (protocol/digest.py; also the only file name a piece may have)."""
    return piece_digest.is_checksum(text)


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


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_all(f, buf: memoryview) -> None:
    """Write all of `buf` to the unbuffered file `f` (a raw write may be short)."""
    done = 0
    for _ in range(1 << 20):  # bounded: each round writes at least one byte or raises
        if done >= len(buf):
            return
        n = f.write(buf[done:])
        if not n:
            raise OSError(errno.EIO, "write returned 0 bytes")
        done += n
    raise OSError(errno.EIO, "write made no progress")


DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, length and offset multiples of this (covers 512 B and 4 KiB blocks)
BOUNCE_BYTES = 4 * 1024 * 1024  # the aligned buffer a piece goes through on its way to an O_DIRECT write
IO_LANES = 4  # O_DIRECT pieces of one call written and fsynced by this many threads at once (each waits for the disk)
_bounce = threading.local()  # one per writing thread (the shard's writer thread, its loop), kept for good


def _bounce_buffer() -> memoryview:
    """This thread's page-aligned bounce buffer: mapped and touched once, then reused for every
    piece, so a write touches no page it has not touched before."""
    buf = getattr(_bounce, "buf", None)
    if buf is None:
        buf = _bounce.buf = memoryview(mmap.mmap(-1, BOUNCE_BYTES))
    return buf


def _open_piece(path: Path, direct: bool):
    """(unbuffered file, whether it is O_DIRECT) for a new piece file; O_DIRECT is asked for only
    when `direct`, and a file system that refuses it (tmpfs: EINVAL) gets a plain file."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return open(path, "wb", buffering=0, opener=lambda p, fl: os.open(p, fl | os.O_DIRECT, 0o666)), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return open(path, "wb", buffering=0), False


def _write_direct(f, buf: memoryview) -> bool:
    """Write all of `buf` to the O_DIRECT file `f` through this thread's bounce buffer (the
    received frames a shard holds are not block-aligned): the disk reads the bytes from that
    buffer, and no page-cache page is filled. The last block is padded with zeros and the file
    cut back to `len(buf)`. False (nothing to rely on in the file) when the kernel refuses
    the alignment (EINVAL) or writes short: the caller writes the file again without O_DIRECT."""
    fd, bounce, off, n = f.fileno(), _bounce_buffer(), 0, len(buf)
    while off < n:
        k = min(BOUNCE_BYTES, n - off)
        bounce[:k] = buf[off:off + k]
        padded = -(-k // DIRECT_ALIGN) * DIRECT_ALIGN
        if padded > k:
            bounce[k:padded] = bytes(padded - k)
        try:
            if os.pwrite(fd, bounce[:padded], off) != padded:
                return False
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False
        off += k
    if n % DIRECT_ALIGN:
        os.ftruncate(fd, n)
    return True


def _write_piece(f, direct: bool, buf: memoryview) -> bool:
    """Write a piece file's bytes; True when they went O_DIRECT (nothing in the page cache)."""
    if direct:
        if _write_direct(f, buf):
            return True
        fd = f.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        os.ftruncate(fd, 0)
    _write_all(f, buf)
    return False


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting (Linux: a
    POSIX_FADV_DONTNEED on dirty pages starts their writeback; it drops only the pages clean
    at the time of the call, so the dirty ones stay cached: `_drop_cached` after the fsync
    drops them). The fsync that follows still decides durability; this only lets the disk
    work on every piece of a stage while the rest are written, instead of one fsync after
    another finding each file's data still in memory."""
    _advise_dontneed(fd)


def _drop_cached(fd: int) -> None:
    """Drop a file's pages from the page cache once its fsync made them clean (a shard never
    reads a piece file again until a restart: it serves the copies it holds in memory).
    Without it every version written stayed cached, the page cache grew by a model's share at
    each full sync until the first prune deleted files, and the stages' writes and receive
    buffers ran on memory the kernel had to hand out fresh (the sync's slow second round,
    docs/benchmarks.md, seventh round, second pass); with it they reuse the pages just freed."""
    _advise_dontneed(fd)


def _advise_dontneed(fd: int) -> None:
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        try:
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:  # advice only: the fsync writes it all anyway
            pass


def _map_piece(path: Path, like: np.ndarray) -> np.ndarray | None:
    """A piece file mapped read-only as an array of `like`'s dtype and shape; None where the file
    cannot be opened or is not exactly as long (the array in memory is then kept). The data dir must
    be the shard's alone: a mapped file that something else cuts short makes the next read of it
    fault (SIGBUS ends the shard; its start then checks every piece again and refuses the version)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != like.nbytes:
                return None
            m = mmap.mmap(f.fileno(), like.nbytes, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    return np.frombuffer(m, dtype=like.dtype).reshape(like.shape)


def _atomic_write(path: Path, payload: bytes, sync_dir: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)


def fallback_version(corrupt: int, history: list[int], good: set[int]) -> int | None:
    """The version to serve when `corrupt` (the current one) cannot be read: the latest earlier
    current version that is older than it and readable. Never a newer one: a newer version in
    the history was current before a rollback, i.e. rolled back on purpose."""
    return next((v for v in reversed(history) if v < corrupt and v in good), None)


def prunable(versions, keep: int, protected: set[int]) -> list[int]:
    """Versions beyond the newest `keep` that may be deleted: never one in `protected` (the
    current version and the one current before it), even when that one is the oldest."""
    ordered = sorted(versions)
    return [v for v in ordered[:max(0, len(ordered) - keep)] if v not in protected]


def unreferenced(stored: set[str], slices: dict) -> set[str]:
    """Piece files (checksums) that no kept version of a model references: safe to delete."""
    used = {c for sl in slices.values() for c in sl.checksums.values()}
    return stored - used


class ShardStore:
    def __init__(self, root: str | os.PathLike, keep: int = 3, fsync: bool = True, direct: bool = True):
        self.root = Path(root)
        self.fsync = fsync  # piece files fsynced before a stage is answered (False: --durability replicated)
        self.direct = direct  # piece files written O_DIRECT when fsynced (False: through the page cache)
        self._pool: ThreadPoolExecutor | None = None  # IO_LANES - 1 more threads writing O_DIRECT pieces
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.slices: dict[str, dict[int, Slice]] = {}  # model -> version -> slice
        self.current: dict[str, int] = {}
        self.history: dict[str, list[int]] = {}  # model -> earlier current versions, oldest first
        self.corrupt: dict[str, dict[int, str]] = {}
        self.fallback: dict[str, dict] = {}  # model -> {"from", "to", "why"} when a corrupt current was replaced
        self.stored: dict[str, set[str]] = {}  # model -> checksums of the piece files on disk
        self.doomed: dict[str, set[int]] = {}  # model -> versions dropped whose data files prune deletes
        self.written = {"pieces": 0, "bytes": 0}  # piece files written since start (stages and commits)
        self.last_commit = {"pieces": 0, "bytes": 0, "shared": 0}  # the last commit's writes
        self.pinned = lambda model: set()  # checksums a collect must keep besides kept versions' (live stages)
        self.pinned_tags = lambda model: set()  # tags of the live stages, whose staged manifests a collect keeps
        self.epochs: dict[str, int] = {}  # model -> stamp of what made the current version current
        self.mapped: dict[str, dict[str, np.ndarray]] = {}  # model -> checksum -> its piece file mapped (`demote`)

    # --------------------------------------------------------------- writing
    def write_pieces(self, model: str, sl: Slice) -> dict:
        """Make the pieces of `sl` not stored yet durable (temporary name, fsync, rename, fsync of
        the directory); no manifest names them yet, so until a commit they are invisible (and a
        collect removes them). Returns {"pieces", "bytes"} written."""
        todo = self.unstored(model, sl)
        done = self.write_files(model, todo)
        self.note_written(model, todo)
        return done

    def unstored(self, model: str, sl: Slice) -> dict[str, np.ndarray]:
        """checksum -> array of the pieces of `sl` that no piece file holds yet (each content once)."""
        stored = self.stored.get(model, set())
        todo: dict[str, np.ndarray] = {}
        for k, c in sl.checksums.items():
            if c not in stored and c not in todo:
                todo[c] = sl.data[k]
        return todo

    def write_files(self, model: str, todo: dict[str, np.ndarray], tag: str = "") -> dict:
        """Write and fsync the piece files `todo` (checksum -> array): the file I/O alone, touching
        none of the store's books, so a shard may run it on a thread while its loop serves (the
        loop then calls `note_written`). Temporary names carry `tag`, so two writers of one
        content never share one. Returns {"pieces", "bytes", "write_s", "fsync_s"}."""
        return self._write_files(model, todo, tag)

    def write_stage(self, model: str, todo: dict[str, np.ndarray], tag: str, sl: Slice) -> dict:
        """A stage's files in one pass, for the writer thread: its new piece files (as
        `write_files`) and its manifest under a temporary name (as `write_staged_manifest`), the
        manifest written before the pieces' fsyncs so the disk works on all of them at once and
        its own fsync, after the pieces' renames, finds little left to do: one wait for the disk
        fewer than writing the manifest after the pieces. The same guarantees: every piece fsynced
        before its rename, the pieces directory fsynced after, the manifest always fsynced.
        Returns write_files' figures plus "manifest_tmp" (its path) and "manifest_s"."""
        return self._write_files(model, todo, tag, sl)

    def _write_files(self, model: str, todo: dict[str, np.ndarray], tag: str = "", sl: Slice | None = None) -> dict:
        pdir = self.root / model / PIECES
        pdir.mkdir(parents=True, exist_ok=True)
        suffix = f".{tag}.tmp" if tag else ".tmp"  # ends in .tmp: what a crash leaves is dropped at start
        tmps = []
        manifest = None
        t0 = t1 = time.monotonic()
        direct = self.fsync and self.direct
        items = list(todo.items())
        lanes = [items[i::IO_LANES] for i in range(IO_LANES)] if direct and len(items) > 1 else [items]
        lanes = [lane for lane in lanes if lane]
        jobs = [self._io_pool().submit(self._write_lane, pdir, suffix, lane) for lane in lanes[1:]]
        here = None
        try:
            try:
                here = self._write_lane(pdir, suffix, lanes[0], sync=sl is None) if lanes else None
                if sl is not None:  # written while the pieces go to disk, fsynced after them
                    manifest = self._open_staged_manifest(model, sl, tag)
                    if here is not None:
                        self._fsync_lane(here[0])
            finally:
                done = [here] if here is not None else []
                failed = None
                for job in jobs:
                    try:
                        done.append(job.result())
                    except BaseException as exc:  # noqa: BLE001 - that lane removed its own files
                        failed = failed or exc
                tmps = [cf for files, _ in done for cf in files]
                if failed is not None:
                    raise failed
            t1 = max((end for _, end in done), default=t0)
        except BaseException:
            for c, f in tmps:  # a full disk, say: leave nothing half written behind
                f.close()
                (pdir / f"{c}{suffix}").unlink(missing_ok=True)
            if manifest is not None:
                manifest[1].close()
                Path(manifest[0]).unlink(missing_ok=True)
            raise
        finally:
            for _, f in tmps:
                f.close()
        for c, _ in tmps:
            os.replace(pdir / f"{c}{suffix}", pdir / c)
        t2 = time.monotonic()
        out = {"pieces": len(todo), "bytes": sum(a.nbytes for a in todo.values()),
               "write_s": round(t1 - t0, 4) if tmps else 0.0}
        if manifest is not None:
            try:
                os.fsync(manifest[1].fileno())  # a manifest is always durable, whatever the pieces' durability
            finally:
                manifest[1].close()
            out["manifest_tmp"], out["manifest_s"] = manifest[0], round(time.monotonic() - t2, 4)
        if tmps and self.fsync:
            _fsync_dir(pdir)
        out["fsync_s"] = round(time.monotonic() - t1 - out.get("manifest_s", 0.0), 4) if tmps else 0.0
        return out

    def close(self) -> None:
        """Let the lanes' threads go (a store writing again starts them anew)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _io_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(IO_LANES - 1, thread_name_prefix="ringserve-piece-io")
        return self._pool

    def _write_lane(self, pdir: Path, suffix: str, lane: list, sync: bool = True) -> tuple[list, float]:
        """Write the pieces of `lane` ((checksum, array) pairs) to their temporary files and, with
        `sync` (and the store's fsync), fsync them. Returns ([(checksum, open file)], when the
        writes ended). On a failure its own files are closed and removed before it raises."""
        files: list = []
        try:
            for c, arr in lane:
                asked = self.fsync and self.direct
                f, direct = _open_piece(pdir / f"{c}{suffix}", asked)
                if asked and not direct:
                    self.direct = False  # refused at open (tmpfs): plain files from now on, no second try
                files.append((c, f))
                if _write_piece(f, direct, memoryview(np.ascontiguousarray(arr)).cast("B")):
                    continue  # on the disk already (O_DIRECT): its fsync makes its size and blocks durable
                if direct:
                    self.direct = False  # this file system took O_DIRECT but not its writes: plain ones from now on
                if self.fsync:
                    _start_writeback(f.fileno())  # the disk starts on this piece while the next is written
            ended = time.monotonic()
            if sync:
                self._fsync_lane(files)
        except BaseException:
            for c, f in files:
                f.close()
                (pdir / f"{c}{suffix}").unlink(missing_ok=True)
            raise
        return files, ended

    def _fsync_lane(self, files: list) -> None:
        for _c, f in files:
            if self.fsync:
                os.fsync(f.fileno())
                _drop_cached(f.fileno())  # clean now: out of the page cache

    def note_written(self, model: str, todo: dict[str, np.ndarray]) -> None:
        """Book piece files `write_files` made (on this store's own thread)."""
        self.stored.setdefault(model, set()).update(todo)
        self.written["pieces"] += len(todo)
        self.written["bytes"] += sum(a.nbytes for a in todo.values())

    def commit(self, model: str, sl: Slice, early: dict | None = None, epoch: int | None = None,
               prune: bool = True) -> dict:
        """Make `sl` durable and current: write the pieces not stored yet, then its manifest.
        `early`: what write_pieces wrote for it at stage time. The versions beyond `keep` leave
        the books here (`_drop`); `prune=False` leaves deleting their files, which takes a while
        for large ones, to a later `prune` call, so the commit is answered and announced first. Returns
        {"pieces", "bytes", "shared"}: what was written for this version, how many of its pieces
        were stored before."""
        wrote = self._write_version(model, sl, early, sync_dir=False)
        self.set_current(model, sl.version, epoch=epoch)  # its directory fsync covers the manifest's rename
        self._drop(model)
        if prune:
            self._prune(model)
        self.last_commit = {**wrote, "shared": max(0, len(set(sl.checksums.values())) - wrote["pieces"])}
        return dict(self.last_commit)

    @staticmethod
    def _manifest(model: str, sl: Slice) -> bytes:
        manifest = {"model": model, "version": sl.version, "format": FORMAT, "digest": sl.digest,
                    "pieces": [[*p.as_list(), sl.checksums[k]] for k, p in sl.pieces.items()]}
        manifest["meta_sha256"] = meta_checksum(manifest)
        return json.dumps(manifest).encode()

    def write_staged_manifest(self, model: str, sl: Slice, tag: str) -> str:
        """Write (and fsync) a stage's manifest under a temporary name of the stage's own
        (`v<N>.manifest.json.<tag>.tmp`: no version exists by it, a start deletes it), so a commit
        of that stage only renames it (`commit(early={"manifest_tmp": ...})`). File I/O only, like
        `write_files`: a shard runs it on its writer thread (`write_stage`: with the pieces). Returns
        the file's path."""
        path, f = self._open_staged_manifest(model, sl, tag)
        try:
            os.fsync(f.fileno())  # a manifest is always durable, whatever the pieces' durability
        finally:
            f.close()
        return path

    def _open_staged_manifest(self, model: str, sl: Slice, tag: str):
        """(path, open file) of a stage's manifest, written, its writeback started, not fsynced yet."""
        if not tag.isalnum():
            raise ValueError("a stage's tag is letters and digits")
        d = self.root / model
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"v{sl.version}.manifest.json.{tag}.tmp"
        f = open(tmp, "wb", buffering=0)
        try:
            _write_all(f, memoryview(self._manifest(model, sl)))
            _start_writeback(f.fileno())
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        return str(tmp), f

    def _write_version(self, model: str, sl: Slice, early: dict | None = None, sync_dir: bool = True) -> dict:
        """Write the pieces of `sl` not stored yet, then its manifest (last: it marks it done).
        A manifest the stage wrote already (`early["manifest_tmp"]`, durable) is renamed into
        place; `sync_dir=False` leaves the fsync of the directory to the caller (a commit: the
        fsync of current.json's rename, in the same directory, makes both renames durable)."""
        d = self.root / model
        now = self.write_pieces(model, sl)  # nothing left to write when the stage wrote them already
        wrote = {k: now[k] + (early or {}).get(k, 0) for k in ("pieces", "bytes")}
        final = d / f"v{sl.version}.manifest.json"
        staged = (early or {}).get("manifest_tmp")
        try:
            if not staged:
                raise FileNotFoundError(final)
            os.replace(staged, final)  # written and fsynced with the stage's pieces
            if sync_dir:
                _fsync_dir(d)
        except FileNotFoundError:  # none written at stage time (or a collect removed it): write it now
            _atomic_write(final, self._manifest(model, sl), sync_dir=sync_dir)  # last: marks it done
        self.slices.setdefault(model, {})[sl.version] = sl
        self.corrupt.get(model, {}).pop(sl.version, None)
        return wrote

    def install(self, model: str, sl: Slice) -> dict:
        """Store a version copied from other owners (repair): durable like a commit, but what is
        current does not change here. Returns {"pieces", "bytes"} written."""
        wrote = self._write_version(model, sl)
        self._prune(model)
        return wrote

    def reshape(self, model: str, version: int, add: Slice | None = None, drop: list[str] = ()) -> int:
        """Add pieces to (or drop pieces from) a stored version's share, as a rebalance does: the
        new pieces are written first, then the manifest is rewritten. Returns the pieces changed."""
        sl = self.slices.get(model, {}).get(version)
        if sl is None:
            return 0
        new = Slice(version, dict(sl.pieces), dict(sl.data), dict(sl.checksums), sl.digest)
        changed = 0
        for k in (add.pieces if add is not None else {}):
            if k not in new.pieces:
                new.pieces[k], new.data[k], new.checksums[k] = add.pieces[k], add.data[k], add.checksums[k]
                changed += 1
        for k in drop:
            if new.pieces.pop(k, None) is not None:
                new.data.pop(k, None)
                new.checksums.pop(k, None)
                changed += 1
        if changed:
            self._write_version(model, new)
            self.collect(model)
        return changed

    def set_current(self, model: str, version: int | None, remember: bool = True, epoch: int | None = None) -> None:
        """Make `version` current (None: no current version); the old one goes to the history.
        `epoch`: the stamp of what made it current (kept; None leaves the old stamp)."""
        old = self.current.get(model)
        hist = self.history.setdefault(model, [])
        if remember and old is not None and old != version:
            hist.append(old)
            del hist[:-HISTORY]
        if version is None:
            self.current.pop(model, None)
        else:
            self.current[model] = version
        if epoch is not None:
            self.epochs[model] = epoch
        self.fallback.pop(model, None)
        (self.root / model).mkdir(parents=True, exist_ok=True)
        _atomic_write(self.root / model / "current.json", json.dumps(
            {"version": version, "history": hist, "epoch": self.epochs.get(model, 0)}).encode())

    def revert(self, model: str, version: int, previous: int | None, epoch: int | None = None) -> None:
        """Undo a commit of `version` (a publish that failed elsewhere): `previous` current again,
        `version` forgotten, so every shard agrees on what exists."""
        if self.current.get(model) == version:
            hist = self.history.get(model, [])
            if hist and hist[-1] == previous:
                hist.pop()
            self.set_current(model, previous, remember=False, epoch=epoch)
        self.slices.get(model, {}).pop(version, None)
        self._forget(model, version)
        self.collect(model)

    def _forget(self, model: str, version: int) -> None:
        """Delete a version's files; the manifest first, so a crash never leaves a manifest without data."""
        for suffix in (".manifest.json", ".safetensors"):
            (self.root / model / f"v{version}{suffix}").unlink(missing_ok=True)

    def protected(self, model: str) -> set[int]:
        """Versions a prune must keep: the current one, and the one current before it (what a
        revert of the last commit, or the rollback that repairs it, makes current again)."""
        return {v for v in (self.current.get(model), *self.history.get(model, [])[-1:]) if v is not None}

    def prune(self, model: str) -> int:
        """Drop the versions beyond `keep` (never the protected ones) and the piece files no kept
        version or live stage references; returns how many piece files were deleted."""
        return self._prune(model)

    def _drop(self, model: str) -> None:
        """Drop the versions beyond `keep` from the books at once, and their manifests (so a
        restart does not bring them back): every replica then refuses them alike, whether or not
        it has deleted their data yet (a rollback, a delta's base). Deleting the data files, which
        takes a while for large ones, is `prune`'s, which a shard may run after answering."""
        for v in prunable(self.slices.get(model, {}), self.keep, self.protected(model)):
            del self.slices[model][v]
            (self.root / model / f"v{v}.manifest.json").unlink(missing_ok=True)
            self.doomed.setdefault(model, set()).add(v)

    def _prune(self, model: str) -> int:
        self._drop(model)
        live = self.slices.get(model, {})
        for v in self.doomed.pop(model, set()):
            if v not in live:  # a version number committed again since it was dropped keeps its files
                self._forget(model, v)
        gone = self.collect(model)
        self.demote(model)
        return gone

    def demote(self, model: str) -> int:
        """Hold only the current version's pieces (and live stages') in memory: a piece that only
        superseded kept versions reference is served from its piece file, mapped read-only, and its
        received buffer freed, so the next stage's frames reuse that memory instead of faulting in
        fresh pages (issue 22, sync13: a shard held its last `keep` versions' bytes and its heap grew
        over the first three full syncs). Only pieces whose file is on disk (booked in `stored`) and
        as long as the array are mapped; anything else stays as it is. Returns how many were mapped."""
        by_v = self.slices.get(model, {})
        cur = by_v.get(self.current.get(model))
        hot = set(cur.checksums.values()) if cur is not None else set()
        hot |= self.pinned(model)
        stored = self.stored.get(model, set())
        mapped = self.mapped.setdefault(model, {})
        for c in set(mapped) - stored:  # its file was deleted: no slice refers to the mapping any more
            del mapped[c]
        pdir = self.root / model / PIECES
        n = 0
        for sl in by_v.values():
            if sl is cur:
                continue
            for k, c in sl.checksums.items():
                a = sl.data.get(k)
                if a is None or c in hot or c not in stored or a.nbytes == 0:
                    continue
                m = mapped.get(c)
                if m is None:
                    m = _map_piece(pdir / c, a)
                    if m is None:
                        continue
                    mapped[c] = m
                    n += 1
                sl.data[k] = m
        return n

    def collect(self, model: str) -> int:
        """Delete the piece files no kept version references (nor a live stage: `pinned`);
        returns how many were deleted."""
        pdir = self.root / model / PIECES
        stored = self.stored.setdefault(model, set())
        gone = unreferenced(stored, self.slices.get(model, {})) - self.pinned(model)
        for c in gone:
            (pdir / c).unlink(missing_ok=True)
        stored -= gone
        live = self.pinned_tags(model)
        for f in (self.root / model).glob("v*.manifest.json.*.tmp"):  # staged manifests of stages now gone
            if f.name.split(".")[-2] not in live:
                f.unlink(missing_ok=True)
        return len(gone)

    # --------------------------------------------------------------- reading
    def load_all(self) -> None:
        """Read every committed version back from disk; mark (and remember) what cannot be read as
        corrupt. Never raises for what is on disk: a shard always starts on its data dir."""
        for d in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                self._load_model(d)
            except Exception as exc:  # noqa: BLE001 - whatever is on disk, the shard starts
                log.error("model_unreadable", model=d.name, error=f"{type(exc).__name__}: {exc}")

    def _scan_pieces(self, model: str, d: Path) -> None:
        """Note the piece files on disk; drop temporary files a crash left behind."""
        for f in d.glob("*.tmp"):  # a staged manifest, or a manifest or current.json cut off mid-write
            f.unlink(missing_ok=True)
        stored = self.stored.setdefault(model, set())
        pdir = d / PIECES
        if not pdir.is_dir():
            return
        for f in pdir.iterdir():
            if f.name.endswith(".tmp"):
                f.unlink(missing_ok=True)
            elif is_checksum(f.name):
                stored.add(f.name)

    def _load_model(self, d: Path) -> None:
        model = d.name
        self._scan_pieces(model, d)
        cache: dict[str, np.ndarray | str] = {}  # checksum -> bytes read and checked (or why not), read once
        for mf in sorted(d.glob("v*.manifest.json")):
            try:
                version = int(mf.name[1:].split(".")[0])
            except ValueError:
                log.warning("stray_file_ignored", model=model, file=mf.name)
                continue
            try:
                self.slices.setdefault(model, {})[version] = self._read(d, version, mf, cache)
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
            epoch = cur.get("epoch", 0)
            self.epochs[model] = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0
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
        self.demote(model)  # the versions before the current one are read from their files when fetched
        log.info("model_loaded_from_disk", model=model, versions=sorted(good), current=self.current.get(model),
                 pieces=len(self.stored.get(model, ())))

    def _read(self, d: Path, version: int, mf: Path, cache: dict) -> Slice:
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as exc:
            raise CorruptVersion(f"v{version}: unreadable ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("meta_sha256") != meta_checksum(manifest):
            raise CorruptVersion(f"v{version}: manifest fails its own checksum (torn or edited)")
        if manifest.get("format") != FORMAT:
            return self._read_single_file(d, version, manifest)
        sl = Slice(version, digest=str(manifest.get("digest", "")))
        for item in manifest["pieces"]:
            piece, checksum = Piece.from_list(item[:6]), item[6]
            if not is_checksum(checksum):
                raise CorruptVersion(f"v{version}: piece {piece.key} has no checksum of a known digest "
                                     f"({CHECKSUM_FORMS})")
            if checksum not in cache:
                cache[checksum] = self._read_piece(d / PIECES / checksum, checksum)
            raw = cache[checksum]
            if isinstance(raw, str):
                raise CorruptVersion(f"v{version}: piece {piece.key}: {raw}")
            itemsize = np.dtype(piece.dtype).itemsize
            if raw.nbytes != (piece.stop - piece.start) * itemsize:
                raise CorruptVersion(f"v{version}: piece {piece.key}: {raw.nbytes} bytes, expected "
                                     f"{(piece.stop - piece.start) * itemsize}")
            sl.pieces[piece.key], sl.data[piece.key], sl.checksums[piece.key] = piece, raw.view(piece.dtype), checksum
        return sl

    @staticmethod
    def _read_piece(path: Path, checksum: str) -> np.ndarray | str:
        """The bytes of one piece file, checked against its checksum; a string saying why not."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            return f"piece file missing or unreadable ({type(exc).__name__})"
        if not checksum_matches(raw, checksum):
            return f"checksum mismatch for piece file {checksum[:16]}... (torn or corrupt file)"
        return np.frombuffer(raw, dtype=np.uint8)

    def _read_single_file(self, d: Path, version: int, manifest: dict) -> Slice:
        """A version written by the earlier format: one safetensors file, its sha256 in the manifest."""
        try:
            payload = (d / f"v{version}.safetensors").read_bytes()
        except OSError as exc:
            raise CorruptVersion(f"v{version}: unreadable ({exc})") from None
        if sha256(payload) != manifest.get("file_sha256"):
            raise CorruptVersion(f"v{version}: checksum mismatch for v{version}.safetensors (torn or corrupt file)")
        arrays = st_load(payload) if payload else {}
        sl = Slice(version, digest=str(manifest.get("digest", "")))
        for item in manifest["pieces"]:
            piece, checksum = Piece.from_list(item[:6]), item[6]
            arr = arrays.get(piece.key)
            if arr is None or not checksum_matches(arr.tobytes(), checksum):
                raise CorruptVersion(f"v{version}: piece {piece.key} missing or failing its checksum")
            sl.pieces[piece.key], sl.data[piece.key], sl.checksums[piece.key] = piece, arr, checksum
        return sl

    def versions(self) -> dict[str, list[int]]:
        return {m: sorted(v) for m, v in self.slices.items()}
