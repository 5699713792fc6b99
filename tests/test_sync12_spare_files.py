"""Issue 22 part 3 (full12): a shard writes new pieces into the files of pruned ones.

paramserver/store.py's `collect` keeps a piece file no kept version references as a spare
(renamed into ``<model>/spare/``, bounded by SPARE_FILES and SPARE_BYTES), and a new piece is
written into a spare instead of a new file: on ext4 without a journal, creating files after many
were deleted made the kernel scan the recently deleted inodes on every create (the largest part
of the shards' writer CPU in bench/weightsync.py). These tests drive the store on a temporary
directory: the bytes on disk when a spare is longer or shorter than the piece written into it
(O_DIRECT, plain, and a refused direct write), that a spare's inode is the one reused, the bounds,
and that a start deletes the spares a run left behind.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from ringserve.paramserver import store as store_mod
from ringserve.paramserver.store import DIRECT_ALIGN, PIECES, SPARES, ShardStore
from ringserve.protocol.digest import checksum

pytestmark = pytest.mark.timeout(60)


def _todo(sizes, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for n in sizes:
        a = rng.integers(0, 255, size=n + 1, dtype=np.uint8)[1:]  # an odd address, as a received frame's
        out[checksum(a)] = a
    return out


def _written(st: ShardStore, todo: dict) -> None:
    st.write_files("m", todo, tag="t")
    st.note_written("m", todo)


def _spares(tmp_path) -> list:
    d = tmp_path / "m" / SPARES
    return sorted(d.iterdir()) if d.is_dir() else []


OLD = (1 << 20, 1 << 20, 3 * DIRECT_ALIGN + 17, 5000)
NEW = (1 << 20, 2 * (1 << 20) + 3, 10, DIRECT_ALIGN, 70_000, 1 << 20)  # same, longer, shorter; more than spares


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync (O_DIRECT)", "replicated (page cache)"])
def test_new_pieces_go_into_the_files_of_collected_ones(tmp_path, fsync):
    st = ShardStore(tmp_path, keep=3, fsync=fsync)
    old = _todo(OLD, 1)
    _written(st, old)
    assert st.collect("m") == len(old)  # no version references them
    spares = _spares(tmp_path)
    assert len(spares) == len(old) and not list((tmp_path / "m" / PIECES).iterdir())
    inodes = {f.stat().st_ino for f in spares}
    new = _todo(NEW, 2)
    _written(st, new)
    pdir = tmp_path / "m" / PIECES
    for c, a in new.items():
        assert (pdir / c).read_bytes() == a.tobytes()
    reused = {(pdir / c).stat().st_ino for c in new} & inodes
    assert len(reused) == len(old) and not _spares(tmp_path)  # every spare taken, the rest new files
    assert not list(pdir.glob("*.tmp"))
    st.close()


def test_a_refused_direct_write_into_a_longer_spare_keeps_the_bytes(tmp_path, monkeypatch):
    st = ShardStore(tmp_path, keep=3)
    _written(st, _todo((1 << 20,), 3))
    st.collect("m")
    monkeypatch.setattr(store_mod, "_write_direct", lambda f, buf: False)  # EINVAL or short: written plainly
    new = _todo((5000,), 4)
    _written(st, new)
    (c, a), = new.items()
    assert (tmp_path / "m" / PIECES / c).read_bytes() == a.tobytes()
    st.close()


def test_spares_are_bounded_and_a_start_deletes_them(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "SPARE_FILES", 2)
    st = ShardStore(tmp_path, keep=3)
    _written(st, _todo((100, 200, 300, 400), 5))
    st.collect("m")
    assert len(_spares(tmp_path)) == 2 and not list((tmp_path / "m" / PIECES).iterdir())
    monkeypatch.setattr(store_mod, "SPARE_FILES", 100)
    monkeypatch.setattr(store_mod, "SPARE_BYTES", 250)
    st2 = ShardStore(tmp_path / "b", keep=3)
    todo = _todo((100, 200, 300), 6)
    st2.write_files("m", todo, tag="t")
    st2.note_written("m", todo)
    st2.collect("m")
    kept = [f.stat().st_size for f in _spares(tmp_path / "b")]
    assert len(kept) == 1 and kept[0] in (100, 200)  # 100 + 200 > 250 and 300 > 250: one of the two first
    again = ShardStore(tmp_path, keep=3)
    again.load_all()
    assert not _spares(tmp_path) and again.versions() == {}
    for s in (st, st2, again):
        s.close()


def test_a_spare_gone_meanwhile_means_a_new_file(tmp_path):
    st = ShardStore(tmp_path, keep=3)
    _written(st, _todo((4096,), 7))
    st.collect("m")
    for f in _spares(tmp_path):
        os.unlink(f)  # whatever removed it, the write goes on
    new = _todo((4096,), 8)
    _written(st, new)
    (c, a), = new.items()
    assert (tmp_path / "m" / PIECES / c).read_bytes() == a.tobytes()
    st.close()
