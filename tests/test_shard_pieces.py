"""Issue 11: content-addressed shard storage and the worker's parallel, pipelined fetch.

The store tests drive paramserver/store.py directly on a temporary directory; the fetch tests
start real shards on 127.0.0.1 ephemeral ports (conftest's `cluster`, stopped after each test),
and a fake shard (a ROUTER in a bounded thread) for replies no real shard would send.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading

import numpy as np
import pytest
import torch
import zmq

from ringserve.client.params import ParamClient
from ringserve.paramserver.store import PIECES, ShardStore, Slice
from ringserve.protocol.codec import pack, unpack_map
from ringserve.protocol.digest import algorithm_of, checksum, checksum_matches, is_checksum
from ringserve.protocol.messages import SHARD_PROTO
from ringserve.protocol.placement import Piece, split
from ringserve.protocol.shardrpc import ShardCallError, ShardRPC
from ringserve.worker.loader import ServedModel, parse_model_arg
from ringserve.worker.sync import assemble, fetch_into, plan_version
from helpers import flip_a_byte, mlp_state

pytestmark = pytest.mark.timeout(120)

SMALL_CHUNK = 64 * 1024  # the MLP's big matrices spread over several pieces and shards


def make_slice(version: int, arrays: dict[str, np.ndarray], algorithm: str = "sha256") -> Slice:
    """A shard's slice holding every array whole (one piece each), as a commit receives it
    (sha256 checksums: what every store before issue 22 holds)."""
    sl = Slice(version, digest=f"d{version}")
    for name, a in arrays.items():
        flat = np.ascontiguousarray(a).reshape(-1)
        p = Piece(name, name, a.dtype.name, tuple(a.shape), 0, flat.size)
        sl.pieces[name], sl.data[name] = p, flat
        sl.checksums[name] = checksum(memoryview(flat).cast("B"), algorithm)
    return sl


def piece_files(root, model="m") -> dict[str, os.stat_result]:
    d = root / model / PIECES
    return {f.name: f.stat() for f in d.iterdir()} if d.is_dir() else {}


# ---------------------------------------------------------------------------------- the store
def test_checksums_name_their_digest_and_only_cryptographic_ones_are_known():
    buf = memoryview(np.arange(1000, dtype=np.float32)).cast("B")
    b3, sha = checksum(buf), checksum(buf, "sha256")
    assert b3.startswith("blake3-") and len(b3) == 71 and algorithm_of(b3) == "blake3"
    assert sha == hashlib.sha256(buf).hexdigest() and algorithm_of(sha) == "sha256"  # the earlier form, bare hex
    assert checksum_matches(buf, b3) and checksum_matches(buf, sha)
    other = memoryview(np.arange(1, 1001, dtype=np.float32)).cast("B")
    assert not checksum_matches(other, b3) and not checksum_matches(other, sha)
    for bad in ("xxh3-" + "0" * 16, "blake3-" + "G" * 64, "blake3-" + "0" * 63, "0" * 63, "../" + "0" * 61, 7, None):
        assert not is_checksum(bad) and not checksum_matches(buf, bad)  # names no known digest: never matches
    with pytest.raises(ValueError, match="unknown digest"):
        checksum(buf, "xxh3")


def test_a_store_of_sha256_pieces_loads_and_takes_blake3_versions_beside_them(tmp_path):
    """An old store (sha256 pieces and manifests) still loads; new versions are written with
    BLAKE3 beside it, a piece the old and new versions share by content is stored under each
    name, every piece is checked against the digest its name says, and a corrupt one of either
    kind is found."""
    rng = np.random.default_rng(4)
    v1 = {f"w{i}": rng.standard_normal(300).astype(np.float32) for i in range(3)}
    v2 = dict(v1, w2=v1["w2"] + 1)
    store = ShardStore(tmp_path, keep=3)
    store.commit("m", make_slice(1, v1, "sha256"))
    store.commit("m", make_slice(2, v2, "blake3"))
    names = set(piece_files(tmp_path))
    assert {algorithm_of(n) for n in names} == {"sha256", "blake3"} and len(names) == 6
    again = ShardStore(tmp_path, keep=3)
    again.load_all()
    assert again.versions() == {"m": [1, 2]} and again.current == {"m": 2} and not again.corrupt
    np.testing.assert_array_equal(again.slices["m"][1].data["w2"].view(np.float32), v1["w2"])
    np.testing.assert_array_equal(again.slices["m"][2].data["w2"].view(np.float32), v2["w2"])
    flip_a_byte(tmp_path / "m" / PIECES / make_slice(2, v2, "blake3").checksums["w0"])
    third = ShardStore(tmp_path, keep=3)
    third.load_all()
    assert third.versions() == {"m": [1]} and "checksum mismatch" in third.corrupt["m"][2]


def test_a_commit_drops_the_versions_past_keep_at_once_and_prune_deletes_their_files_later(tmp_path):
    """A commit answered before its prune (prune=False) still drops the versions beyond `keep`
    from the books and their manifests at once, so every replica refuses them alike (a rollback,
    a delta's base) whether or not it has deleted their data yet; the later prune deletes the
    files, but never those of a version number committed again meanwhile."""
    rng = np.random.default_rng(5)
    vs = {v: {"w": rng.standard_normal(200).astype(np.float32)} for v in (1, 2, 3)}
    store = ShardStore(tmp_path, keep=2)
    store.commit("m", make_slice(1, vs[1]), prune=False)
    store.commit("m", make_slice(2, vs[2]), prune=False)
    store.commit("m", make_slice(3, vs[3]), prune=False)
    assert store.versions() == {"m": [2, 3]}  # v1 is gone from the books before any prune
    assert not (tmp_path / "m" / "v1.manifest.json").exists()
    again = ShardStore(tmp_path, keep=2)
    again.load_all()
    assert again.versions() == {"m": [2, 3]}  # and a restart does not bring it back
    assert len(piece_files(tmp_path)) == 3  # its piece file waits for the prune
    store.prune("m")
    assert set(piece_files(tmp_path)) == {make_slice(v, vs[v]).checksums["w"] for v in (2, 3)}
    store.commit("m", make_slice(4, vs[1]), prune=False)  # v2 dropped; its number is not reused here
    store.doomed["m"].add(3)  # as if v3 had been dropped and committed again before the prune ran
    store.prune("m")
    assert store.versions() == {"m": [3, 4]} and (tmp_path / "m" / "v3.manifest.json").exists()


def test_a_stage_with_a_checksum_of_no_known_digest_is_refused():
    from ringserve.paramserver.shard import _piece
    from ringserve.protocol.messages import ProtocolError

    good = ["w", "w", "float32", [4], 0, 4]
    for ok in ("blake3-" + "a" * 64, "a" * 64):
        assert _piece([*good, ok])[1] == ok
    with pytest.raises(ProtocolError, match="blake3-<64 lowercase hex> or 64 lowercase hex"):
        _piece([*good, "xxh3-" + "a" * 16])  # fast but not cryptographic: a peer could forge it


def test_a_delta_commit_writes_only_the_changed_pieces_and_shares_the_rest(tmp_path):
    rng = np.random.default_rng(1)
    v1 = {f"w{i}": rng.standard_normal(1000).astype(np.float32) for i in range(4)}
    store = ShardStore(tmp_path, keep=3)
    assert store.commit("m", make_slice(1, v1))["pieces"] == 4
    before = piece_files(tmp_path)
    v2 = dict(v1, w0=v1["w0"] + 1)
    wrote = store.commit("m", make_slice(2, v2))
    assert wrote == {"pieces": 1, "bytes": 4000, "shared": 3}
    after = piece_files(tmp_path)
    assert len(after) == 5 and set(before) <= set(after)
    for name, st in before.items():  # unchanged pieces were not rewritten
        assert (after[name].st_ino, after[name].st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    manifest = json.loads((tmp_path / "m" / "v2.manifest.json").read_text())
    assert manifest["format"] == 2 and len(manifest["pieces"]) == 4
    again = ShardStore(tmp_path, keep=3)  # read back from disk: both versions whole
    again.load_all()
    assert again.versions() == {"m": [1, 2]} and again.current == {"m": 2} and not again.corrupt
    for version, arrays in ((1, v1), (2, v2)):
        for name, a in arrays.items():
            np.testing.assert_array_equal(again.slices["m"][version].data[name], a)


def test_a_corrupt_stored_piece_is_detected_and_its_versions_refused(tmp_path):
    rng = np.random.default_rng(2)
    v1 = {f"w{i}": rng.standard_normal(500).astype(np.float32) for i in range(3)}
    v2 = dict(v1, w2=v1["w2"] * 2)
    store = ShardStore(tmp_path, keep=3)
    store.commit("m", make_slice(1, v1))
    store.commit("m", make_slice(2, v2))
    only_v2 = make_slice(2, v2).checksums["w2"]
    flip_a_byte(tmp_path / "m" / PIECES / only_v2)
    again = ShardStore(tmp_path, keep=3)
    again.load_all()
    assert again.versions() == {"m": [1]} and "checksum mismatch" in again.corrupt["m"][2]
    assert again.current == {"m": 1} and again.fallback["m"]["from"] == 2  # falls back, never serves v2
    shared = make_slice(1, v1).checksums["w0"]  # a piece both versions use: both are refused
    flip_a_byte(tmp_path / "m" / PIECES / shared)
    third = ShardStore(tmp_path, keep=3)
    third.load_all()
    assert set(third.corrupt["m"]) == {1, 2} and not third.versions().get("m")
    assert "m" not in third.current
    (tmp_path / "m" / PIECES / shared).unlink()  # a missing piece file: corrupt too, and the store still starts
    fourth = ShardStore(tmp_path, keep=3)
    fourth.load_all()
    assert "missing" in fourth.corrupt["m"][1]


def test_pieces_no_kept_version_references_are_removed(tmp_path):
    rng = np.random.default_rng(3)
    store = ShardStore(tmp_path, keep=2)
    versions = {v: {"a": rng.standard_normal(100).astype(np.float32), "shared": np.arange(50, dtype=np.int64)}
                for v in (1, 2, 3)}
    for v, arrays in versions.items():
        store.commit("m", make_slice(v, arrays))
    sums = {v: make_slice(v, a).checksums for v, a in versions.items()}
    files = set(piece_files(tmp_path))
    assert sums[1]["a"] not in files and not (tmp_path / "m" / "v1.manifest.json").exists()  # pruned with v1
    assert {sums[2]["a"], sums[3]["a"], sums[1]["shared"]} == files  # the shared piece stays (v2, v3 use it)
    store.revert("m", 3, previous=2)  # a publish that failed elsewhere: its own pieces go too
    assert set(piece_files(tmp_path)) == {sums[2]["a"], sums[2]["shared"]} and store.current == {"m": 2}
    staged = make_slice(4, {"a": np.ones(10, np.float32)})
    assert store.write_pieces("m", staged)["pieces"] == 1  # written on arrival, no manifest names it
    store.collect("m")  # an aborted or expired stage: removed
    assert set(piece_files(tmp_path)) == {sums[2]["a"], sums[2]["shared"]}
    (tmp_path / "m" / PIECES / ("0" * 64 + ".tmp")).write_bytes(b"torn")  # a crash mid-write
    again = ShardStore(tmp_path, keep=2)
    again.load_all()
    assert not list((tmp_path / "m" / PIECES).glob("*.tmp")) and again.versions() == {"m": [2]}


def test_a_commit_rewrites_a_staged_piece_collected_before_it(tmp_path):
    """Pieces written at stage time and removed by a collect (another version's commit) before
    their own commit are written again from memory: a commit never names a missing file."""
    store = ShardStore(tmp_path, keep=1)
    staged = make_slice(2, {"b": np.full(64, 7, np.float32)})
    store.write_pieces("m", staged)
    store.commit("m", make_slice(1, {"a": np.zeros(8, np.float32)}))  # collects the staged piece
    assert staged.checksums["b"] not in piece_files(tmp_path)
    assert store.commit("m", staged)["pieces"] == 1
    again = ShardStore(tmp_path, keep=1)
    again.load_all()
    # keep=1 still keeps v1, current before v2: a revert of v2 (or a rollback) needs it (issue 16 item 12)
    assert again.versions() == {"m": [1, 2]} and not again.corrupt
    pending = make_slice(4, {"c": np.full(32, 3, np.float32)})  # the shard pins what its live stages wrote
    again.pinned = lambda model: set(pending.checksums.values())
    again.write_pieces("m", pending)
    again.commit("m", make_slice(3, {"a": np.zeros(8, np.float32)}))
    assert pending.checksums["c"] in piece_files(tmp_path) and again.commit("m", pending)["pieces"] == 0


# ---------------------------------------------------------------------------------- the fetch
def fetch(eps: dict, model: str, version: int, held=None, shapes=None, timeout=10.0, **kw):
    ctx = zmq.Context()
    rpc = ShardRPC(ctx, eps, timeout=10.0)
    try:
        manifests = {n: h["manifest"] for n, (h, _) in rpc.call_all(
            {"cmd": "fetch", "model": model, "version": version, "manifest_only": True}).items()}
        new, need = plan_version(manifests, held, shapes)
        fetch_into(rpc, model, version, need, new, timeout, **kw)
        return new, need
    finally:
        rpc.close()
        ctx.destroy(linger=0)


def test_parallel_pipelined_fetch_assembles_the_right_tensors_and_a_delta_fetches_only_changes(cluster):
    eps = cluster.start_shards(3)
    v1 = {k: v.numpy() for k, v in mlp_state(1).items()}
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        pc.publish("mlp", v1)
        big = max(v1, key=lambda k: v1[k].size)
        v2_changed = {big: v1[big] + 1}
        pc.publish("mlp", v2_changed, base=1)
    model = ServedModel(parse_model_arg("mlp=ringserve.worker.demo:mlp"), torch.device("cpu"))
    shapes = {k: shape for k, (shape, _) in model.layout.items()}
    new, need = fetch(eps, "mlp", 1, shapes=shapes, window=2, batch_bytes=100_000)  # many small requests in flight
    assert len(need) == 3  # every shard asked at once
    for k, a in v1.items():
        np.testing.assert_array_equal(new.flat[k].reshape(a.shape), a)
    v2, need2 = fetch(eps, "mlp", 2, held=new, shapes=shapes, window=3, batch_bytes=SMALL_CHUNK)
    fetched = {p.key for items in need2.values() for p, _ in items}
    assert fetched == {p.key for p in split(big, "float32", v1[big].shape, 4, SMALL_CHUNK)}
    for k in v1:
        if k != big:
            assert v2.flat[k] is new.flat[k]  # unchanged tensors are shared, not fetched or copied
    np.testing.assert_array_equal(v2.flat[big].reshape(v1[big].shape), v1[big] + 1)
    assert np.array_equal(new.flat[big].reshape(v1[big].shape), v1[big])  # the held version is untouched
    module = model.build_shadow(v2.tensors())
    for k, t in module.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), (v1[k] + 1) if k == big else v1[k])


class FakeShard(threading.Thread):
    """Answers a manifest honestly and every piece fetch with `tamper(header, frames)` applied."""

    def __init__(self, ctx: zmq.Context, arrays: dict[str, np.ndarray], tamper):
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.slice, self.tamper, self.stop = make_slice(1, arrays), tamper, threading.Event()
        self.rid_offset = 0

    def run(self) -> None:
        sl = self.slice
        try:
            for _ in range(2000):  # bounded: 10 s at most
                if self.stop.is_set():
                    return
                if not self.sock.poll(5):
                    continue
                ident, _proto, raw = self.sock.recv_multipart()[:3]
                h = unpack_map(raw)
                keys = list(sl.pieces) if h.get("manifest_only") else h["keys"]
                items = [[*sl.pieces[k].as_list(), sl.checksums[k]] for k in keys]
                if h.get("manifest_only"):
                    reply, frames = {"ok": True, "manifest": items}, []
                else:
                    reply, frames = {"ok": True, "pieces": items}, [sl.data[k].tobytes() for k in keys]
                    reply, frames = self.tamper(reply, frames)
                reply["rid"] = h["rid"] if h.get("manifest_only") else h["rid"] + self.rid_offset
                self.sock.send_multipart([ident, SHARD_PROTO, pack(reply), *frames])
                if self.rid_offset and not h.get("manifest_only"):  # a stream of stale replies
                    for _ in range(20):
                        self.sock.send_multipart([ident, SHARD_PROTO, pack(reply), *frames])
        finally:
            self.sock.close(linger=0)


@pytest.mark.parametrize("tamper, why", [
    (lambda r, f: (r, [f[0][:-1] + bytes([f[0][-1] ^ 1]), *f[1:]]), "failed its checksum"),
    (lambda r, f: (r, [f[0][:-4], *f[1:]]), "bytes, expected"),
    (lambda r, f: ({**r, "pieces": [[*r["pieces"][0][:6], "0" * 64], *r["pieces"][1:]]}, f), "not one asked for"),
    (lambda r, f: (r, f[:-1]), "no frame"),
    (lambda r, f: (r, [*f, b"extra"]), "more frames than pieces"),
])
def test_a_shard_sending_other_bytes_than_asked_is_refused(tamper, why):
    arrays = {"w": np.arange(4096, dtype=np.float32), "b": np.ones(16, np.float32)}
    ctx = zmq.Context()
    shard = FakeShard(ctx, arrays, tamper)
    shard.start()
    try:
        with pytest.raises(ValueError, match=why):
            fetch({"fake": shard.endpoint}, "m", 1)
    finally:
        shard.stop.set()
        shard.join(10)
        ctx.destroy(linger=0)


def test_assemble_and_fetch_agree_on_whole_and_split_tensors(cluster):
    eps = cluster.start_shards(2)
    v1 = {k: v.numpy() for k, v in mlp_state(4).items()}
    with ParamClient(eps, chunk_bytes=SMALL_CHUNK) as pc:
        pc.publish("mlp", v1)
        replies = pc.rpc.call_all({"cmd": "fetch", "model": "mlp", "version": 1})
        manifests = {n: h["manifest"] for n, (h, _) in pc.rpc.call_all(
            {"cmd": "fetch", "model": "mlp", "version": 1, "manifest_only": True}).items()}
    whole = assemble(manifests, replies, None)
    piecewise, _ = fetch(eps, "mlp", 1)
    for k, a in v1.items():
        np.testing.assert_array_equal(whole.flat[k], a.reshape(-1))
        np.testing.assert_array_equal(piecewise.flat[k], a.reshape(-1))


# ---------------------------------------------------------------------------------- the build
class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.b.weight = self.a.weight  # one tensor under two names

    def forward(self, x):
        return {"y": self.b(self.a(x))}


def test_the_new_module_takes_the_fetched_tensors_and_never_touches_the_live_one():
    model = ServedModel(parse_model_arg("mlp=ringserve.worker.demo:mlp"), torch.device("cpu"))
    live = {k: v.clone() for k, v in model.module.state_dict().items()}
    state = {k: v.numpy() for k, v in mlp_state(7).items()}
    tensors = {k: torch.from_numpy(a) for k, a in state.items()}
    module = model.build_shadow(tensors)
    for k, t in module.state_dict().items():
        assert t.data_ptr() == tensors[k].data_ptr()  # no copy: the fetched memory is the module's
        assert torch.equal(model.module.state_dict()[k], live[k])  # the live module is untouched
    assert all(isinstance(p, torch.nn.Parameter) for _, p in module.named_parameters())
    half = ServedModel(parse_model_arg("mlp=ringserve.worker.demo:mlp,dtype=float16"), torch.device("cpu"))
    converted = half.build_shadow(tensors)  # another served dtype: converted, once
    assert all(t.dtype == torch.float16 for t in converted.state_dict().values() if t.is_floating_point())


def test_tied_weights_stay_tied(monkeypatch):
    import ringserve.worker.demo as demo_mod

    monkeypatch.setattr(demo_mod, "tied", Tied, raising=False)
    model = ServedModel(parse_model_arg("t=ringserve.worker.demo:tied"), torch.device("cpu"))
    state = {k: torch.randn_like(v) for k, v in model.module.state_dict().items()}
    state["b.weight"] = state["a.weight"]
    module = model.build_shadow(state)
    assert module.a.weight is module.b.weight and torch.equal(module.a.weight, state["a.weight"])


def test_stale_replies_are_dropped_and_do_not_keep_a_fetch_waiting():
    ctx = zmq.Context()
    shard = FakeShard(ctx, {"w": np.arange(64, dtype=np.float32)}, lambda r, f: (r, f))
    shard.rid_offset = 1000  # every piece reply answers a request never made
    shard.start()
    try:
        with pytest.raises(ShardCallError, match="answer"):
            fetch({"fake": shard.endpoint}, "m", 1, timeout=1.0)
    finally:
        shard.stop.set()
        shard.join(10)
        ctx.destroy(linger=0)


def test_a_data_dir_of_the_earlier_single_file_format_is_read_and_built_on(tmp_path):
    from safetensors.numpy import save as st_save

    from ringserve.paramserver.store import meta_checksum, sha256

    v1 = {"w": np.arange(100, dtype=np.float32), "b": np.ones(10, np.float32)}
    sl = make_slice(1, v1)
    payload = st_save(dict(sl.data))
    manifest = {"model": "m", "version": 1, "file_sha256": sha256(payload), "digest": "d1",
                "pieces": [[*p.as_list(), sl.checksums[k]] for k, p in sl.pieces.items()]}
    manifest["meta_sha256"] = meta_checksum(manifest)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "v1.safetensors").write_bytes(payload)
    (tmp_path / "m" / "v1.manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "m" / "current.json").write_text(json.dumps({"version": 1, "history": []}))
    store = ShardStore(tmp_path, keep=3)
    store.load_all()
    assert store.current == {"m": 1} and not store.corrupt
    v2 = make_slice(2, {"w": v1["w"] + 1})  # a delta on the old version: its "b" comes from v1's file
    v2.pieces["b"], v2.data["b"], v2.checksums["b"] = sl.pieces["b"], store.slices["m"][1].data["b"], sl.checksums["b"]
    assert store.commit("m", v2)["pieces"] == 2  # v1's piece is written as a piece file now
    again = ShardStore(tmp_path, keep=3)
    again.load_all()
    assert again.versions() == {"m": [1, 2]} and again.current == {"m": 2} and not again.corrupt
    np.testing.assert_array_equal(again.slices["m"][2].data["b"], v1["b"])


def test_a_second_owner_listing_a_piece_equally_is_a_source_and_any_other_entry_is_refused():
    """plan_version parses an entry once (sixth round): another owner's entry equal to it, type for
    type, only adds a source; one that differs is parsed and checked as before (other content:
    refused), and one shard listing a piece twice is refused."""
    entry = ["w:0", "w", "float32", [4], 0, 4, "0" * 64]
    new, need = plan_version({"a": [list(entry)], "b": [list(entry)]}, None)
    assert new.sources == {"w:0": ["a", "b"]} and sum(map(len, need.values())) == 1
    with pytest.raises(ValueError):
        plan_version({"a": [list(entry)], "b": ["w:0", "w", "float32", [4], 0, 4, "1" * 64]}, None)
    with pytest.raises(ValueError):
        plan_version({"a": [list(entry)], "b": ["w:0", "w", "float32", [4, 1], 0, 4, "0" * 64]}, None)
    with pytest.raises(ValueError):  # one shard listing it twice
        plan_version({"a": [list(entry), list(entry)]}, None)
