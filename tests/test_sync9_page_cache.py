"""Issue 22 part 3 (sync9): a shard's piece files leave the page cache once fsynced.

paramserver/store.py's `_write_files` starts each piece's writeback with POSIX_FADV_DONTNEED
right after its write (the pages are dirty then, so they stay cached) and, since sync9, drops
the pages with the same advice after the piece's fsync (clean then): a shard serves the copies
it holds in memory and never reads a piece file again until a restart. These tests drive the
store directly on a temporary directory: the order (fsync, then drop, for every piece), none
of it with `fsync=False` (dirty pages cannot be dropped; `--durability replicated`), the data
on disk unchanged, and, on a disk-backed file system where Linux's mincore says so, no page of
a written piece left resident.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np
import pytest

from ringserve.paramserver import store as store_mod
from ringserve.paramserver.store import PIECES, ShardStore
from ringserve.protocol.digest import checksum

pytestmark = pytest.mark.timeout(60)


def _todo(n: int = 6, size: int = 300_000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(9)
    out = {}
    for _ in range(n):
        a = rng.integers(0, 255, size=size, dtype=np.uint8)
        out[checksum(a)] = a
    return out


def _record(monkeypatch) -> list[tuple[str, int]]:
    """Every fsync and every drop the store makes, in order, by fd."""
    calls: list[tuple[str, int]] = []
    real_fsync, real_drop = os.fsync, store_mod._drop_cached

    def fsync(fd):
        calls.append(("fsync", fd))
        real_fsync(fd)

    def drop(fd):
        calls.append(("drop", fd))
        real_drop(fd)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    monkeypatch.setattr(store_mod, "_drop_cached", drop)
    return calls


def test_each_piece_dropped_right_after_its_fsync(tmp_path, monkeypatch):
    calls = _record(monkeypatch)
    todo = _todo()
    st = ShardStore(tmp_path, keep=3)
    out = st.write_files("m", todo, tag="t1")
    assert out["pieces"] == len(todo)
    drops = [i for i, (what, _) in enumerate(calls) if what == "drop"]
    assert len(drops) == len(todo)  # one drop a piece, nothing else dropped
    for i in drops:  # each drop follows the fsync of the same file (sync11: lanes of pieces interleave)
        assert [c for c in calls[:i] if c[1] == calls[i][1]][-1] == ("fsync", calls[i][1])
    for c, a in todo.items():  # the data on disk is what was written
        assert (tmp_path / "m" / PIECES / c).read_bytes() == a.tobytes()


def test_no_drop_without_fsync(tmp_path, monkeypatch):
    calls = _record(monkeypatch)
    st = ShardStore(tmp_path, keep=3, fsync=False)
    st.write_files("m", _todo(3), tag="t1")
    assert not [c for c in calls if c[0] == "drop"]


def _resident_pages(path) -> int | None:
    """Pages of `path` in the page cache (Linux mincore on a private map), None where it cannot be asked."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private, untouched: mincore sees the cache
        view = (ctypes.c_char * size).from_buffer(m)
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vec)
        del view
        m.close()
    if rc != 0:
        return None
    return sum(b & 1 for b in vec)


def _fs_type(path) -> str:
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) >= len(best):
                best, kind = parts[1], parts[2]
    return kind


def test_written_pieces_not_resident(tmp_path):
    if not os.path.exists("/proc/mounts") or _fs_type(tmp_path) not in ("ext4", "xfs", "btrfs", "ext3"):
        pytest.skip("page-cache residency is only checked on a disk-backed Linux file system")
    todo = _todo()
    st = ShardStore(tmp_path, keep=3)
    st.write_files("m", todo, tag="t1")
    resident = [_resident_pages(tmp_path / "m" / PIECES / c) for c in todo]
    if any(r is None for r in resident):
        pytest.skip("mincore not available")
    assert sum(resident) == 0
