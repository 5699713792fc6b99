"""Issue 22 part 3 (sync11): a shard writes its fsynced piece files with O_DIRECT.

paramserver/store.py's `_write_files` copies each piece through a page-aligned bounce buffer of
the writing thread's own (reused, so no fresh page is touched) into a file opened O_DIRECT: the
disk reads the bytes from that buffer, and no page-cache page is filled (the copy into fresh
page-cache pages was most of the shards' writer threads' CPU in the bench). The last block is
padded and the file cut back to its length; the fsync that follows is what makes it durable, as
before. These tests drive the store on a temporary directory: the bytes on disk for lengths
that are and are not block multiples and longer than the bounce buffer, the file flags
(O_DIRECT only when fsynced), the fallback when the kernel refuses the alignment or writes
short, and the order (every piece fsynced before its rename).
"""
from __future__ import annotations

import errno
import fcntl
import os

import numpy as np
import pytest

from ringserve.paramserver import store as store_mod
from ringserve.paramserver.store import BOUNCE_BYTES, DIRECT_ALIGN, PIECES, ShardStore
from ringserve.protocol.digest import checksum

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's")]


def _todo(sizes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    out = {}
    for n in sizes:
        a = rng.integers(0, 255, size=n + 1, dtype=np.uint8)[1:]  # an odd address, as a received frame's
        out[checksum(a)] = a
    return out


SIZES = (1, DIRECT_ALIGN - 1, DIRECT_ALIGN, 3 * DIRECT_ALIGN + 17, BOUNCE_BYTES, BOUNCE_BYTES + 5000, 0)


def _direct_works(tmp_path) -> bool:
    try:
        fd = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def _flags(monkeypatch) -> list[bool]:
    """Whether each piece file the store opens is O_DIRECT, in order."""
    seen: list[bool] = []
    real = store_mod._write_piece

    def spy(f, direct, buf):
        seen.append(bool(fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_DIRECT))
        return real(f, direct, buf)

    monkeypatch.setattr(store_mod, "_write_piece", spy)
    return seen


def test_direct_writes_keep_every_byte(tmp_path, monkeypatch):
    seen = _flags(monkeypatch)
    todo = _todo(SIZES)
    st = ShardStore(tmp_path, keep=3)
    out = st.write_files("m", todo, tag="t1")
    assert out["pieces"] == len(todo) and out["bytes"] == sum(SIZES)
    for c, a in todo.items():
        assert (tmp_path / "m" / PIECES / c).read_bytes() == a.tobytes()
    if _direct_works(tmp_path):
        assert seen == [True] * len(todo) and st.direct
    assert not list((tmp_path / "m" / PIECES).glob("*.tmp"))


def test_no_direct_without_fsync(tmp_path, monkeypatch):
    """`--durability replicated`: the pieces go to the page cache (a direct write would wait for the disk)."""
    seen = _flags(monkeypatch)
    todo = _todo((5000, 70_000))
    ShardStore(tmp_path, keep=3, fsync=False).write_files("m", todo, tag="t1")
    assert seen == [False, False]
    for c, a in todo.items():
        assert (tmp_path / "m" / PIECES / c).read_bytes() == a.tobytes()


@pytest.mark.parametrize("how", ["einval", "short"])
def test_a_refused_direct_write_is_written_plainly(tmp_path, monkeypatch, how):
    """A kernel that opens O_DIRECT but refuses its writes (EINVAL), or writes short: the file is
    written again through the page cache, whole, and the store stops asking for O_DIRECT."""
    if not _direct_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open (the plain path is the other tests')")
    real = os.pwrite

    def pwrite(fd, buf, off):
        if how == "einval":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, memoryview(buf)[:DIRECT_ALIGN], off) if len(buf) > DIRECT_ALIGN else 0

    monkeypatch.setattr(store_mod.os, "pwrite", pwrite)
    todo = _todo((3 * DIRECT_ALIGN + 17, 20_000))
    st = ShardStore(tmp_path, keep=3)
    st.write_files("m", todo, tag="t1")
    assert not st.direct
    for c, a in todo.items():
        assert (tmp_path / "m" / PIECES / c).read_bytes() == a.tobytes()


def test_every_direct_piece_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    calls: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        real_fsync(fd)

    def replace(a, b):
        calls.append(("replace", str(a)))
        real_replace(a, b)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    monkeypatch.setattr(store_mod.os, "replace", replace)
    todo = _todo((10_000, 300_000))
    ShardStore(tmp_path, keep=3).write_files("m", todo, tag="t1")
    renames = [i for i, (what, _) in enumerate(calls) if what == "replace"]
    assert len(renames) == len(todo)
    for i in renames:
        assert ("fsync", calls[i][1]) in calls[:i] or not os.path.exists("/proc/self/fd")


def test_a_file_system_refusing_o_direct_gets_plain_files(tmp_path, monkeypatch):
    """Refused at open (tmpfs: EINVAL): plain writes, the same bytes, and no second try."""
    opened: list[int] = []
    real_open = os.open

    def refusing(path, flags, mode=0o777, **kw):
        opened.append(flags)
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(store_mod.os, "open", refusing)
    todo = _todo((5000, 9000, 70_000, 123))
    st = ShardStore(tmp_path, keep=3)
    st.write_files("m", todo, tag="t1")
    assert not st.direct and sum(1 for fl in opened if fl & os.O_DIRECT) <= 4  # at most once per lane
    for c, a in todo.items():
        assert (tmp_path / "m" / PIECES / c).read_bytes() == a.tobytes()
