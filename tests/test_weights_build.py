"""Issue 22, fifth round: what a version costs to build and to commit.

Building a new version's module off to the side (worker/loader.py `build_shadow`): the live
module's structure is deep-copied with each live tensor mapped straight to its replacement (no
placeholders, no load_state_dict pass), and the load_state_dict route is kept for modules that
take part in loading themselves (load hooks, their own _load_from_state_dict). Either way the new
module serves exactly the new tensors and the live one is never touched.

Committing on a shard (paramserver/store.py): the stage's writer thread writes the manifest too,
under a temporary name; the commit renames it and writes current.json, with one directory fsync."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import ringserve.worker.demo as demo_mod
from ringserve.worker.loader import ServedModel, parse_model_arg
from ringserve.paramserver.store import ShardStore, Slice
from ringserve.protocol.digest import checksum
from ringserve.protocol.placement import Piece

pytestmark = pytest.mark.timeout(60)


class Aliased(torch.nn.Module):
    """Keeps its layers in a plain list too (outside _modules) and a buffer: every route to a
    tensor must lead to the new version's."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.order = [self.a, self.b]  # not registered: deepcopy's memo must map it consistently
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        for layer in self.order:
            x = layer(x)
        return {"y": x * self.scale}


class Hooked(torch.nn.Linear):
    """A module that takes part in loading (a pre-hook that records it ran)."""

    calls = 0

    def __init__(self):
        super().__init__(4, 4)
        self._register_load_state_dict_pre_hook(self._seen)

    @classmethod
    def _seen(cls, *args, **kwargs):
        cls.calls += 1

    def forward(self, x):
        return {"y": super().forward(x)}


def _model(monkeypatch, name, factory) -> ServedModel:
    monkeypatch.setattr(demo_mod, name, factory, raising=False)
    return ServedModel(parse_model_arg(f"{name}=ringserve.worker.demo:{name}"), torch.device("cpu"))


def test_the_build_puts_the_fetched_tensors_in_without_a_load_state_dict_pass(monkeypatch):
    model = ServedModel(parse_model_arg("big=ringserve.worker.demo:stack,arg.layers=3,arg.width=8"),
                        torch.device("cpu"))
    live = {k: v.clone() for k, v in model.module.state_dict().items()}
    tensors = {k: torch.randn_like(v) for k, v in live.items()}

    def no_load(*a, **kw):
        raise AssertionError("load_state_dict called for a plain module")

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", no_load)
    module = model.build_shadow(tensors)
    got = module.state_dict(keep_vars=True)
    for k, t in got.items():
        assert t.data_ptr() == tensors[k].data_ptr()  # the fetched memory is the module's: no copy
        assert isinstance(t, torch.nn.Parameter) and t.requires_grad == model.module.state_dict(
            keep_vars=True)[k].requires_grad
        assert torch.equal(model.module.state_dict()[k], live[k])  # the live module is untouched
    assert module is not model.module


def test_every_route_to_a_tensor_leads_to_the_new_one(monkeypatch):
    model = _model(monkeypatch, "aliased", Aliased)
    live = {k: v.clone() for k, v in model.module.state_dict().items()}
    state = {k: torch.randn_like(v) for k, v in live.items()}
    module = model.build_shadow(state)
    assert module.order[0] is module.a and module.order[1] is module.b  # the list follows the copy
    assert module.scale.data_ptr() == state["scale"].data_ptr()
    x = torch.randn(2, 4)
    expected = torch.nn.functional.linear(torch.nn.functional.linear(x, state["a.weight"], state["a.bias"]),
                                          state["b.weight"], state["b.bias"]) * state["scale"]
    torch.testing.assert_close(module(x)["y"], expected)
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, live[k])  # the live module (and its list) still serve the old weights
    assert model.module.order[0] is model.module.a


class Shared(torch.nn.Module):
    """One submodule under two names, a non-persistent buffer, plain-data attributes."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.again = self.a
        self.norm = torch.nn.LayerNorm(4)
        self.register_buffer("tmp", torch.zeros(4), persistent=False)
        self.input_spec = {"x": ((None, 4), "float32")}
        self.sizes = [4, 4]

    def forward(self, x):
        return {"y": self.norm(self.again(x)) + self.tmp}


def test_a_plain_module_is_cloned_without_deepcopy_and_shares_nothing_mutable(monkeypatch):
    """The sixth round's build: a plain module's structure is cloned attribute by attribute (no
    copy.deepcopy walk); the clone takes the new tensors, keeps one submodule used twice as one,
    and shares no mutable attribute with the live module."""
    import copy as copy_mod

    model = ServedModel(parse_model_arg("big=ringserve.worker.demo:stack,arg.layers=3,arg.width=8"),
                        torch.device("cpu"))
    tensors = {k: torch.randn_like(v) for k, v in model.module.state_dict().items()}

    def no_deepcopy(*a, **kw):
        raise AssertionError("deepcopy called for a plain module")

    monkeypatch.setattr(copy_mod, "deepcopy", no_deepcopy)
    module = model.build_shadow(tensors)
    for k, t in module.state_dict(keep_vars=True).items():
        assert t.data_ptr() == tensors[k].data_ptr()
    was = model.module.training
    module.train(not was)
    assert model.module.training == was  # the flag is the clone's own
    assert module.input_spec == model.module.input_spec and module.input_spec is not model.module.input_spec
    for new, old in zip(module.modules(), model.module.modules(), strict=True):
        assert new is not old and new._parameters is not old._parameters and new._forward_hooks is not old._forward_hooks
    monkeypatch.undo()
    torch.testing.assert_close(module(torch.ones(1, 8))["y"],
                               torch.func.functional_call(model.module, tensors, torch.ones(1, 8))["y"])


def test_a_clone_keeps_a_shared_submodule_one_and_copies_plain_attributes(monkeypatch):
    from ringserve.worker.loader import _clone_structure

    live = Shared()
    memo = {id(t): (torch.nn.Parameter(t.detach() + 1) if isinstance(t, torch.nn.Parameter) else t + 1)
            for t in [*live.parameters(), *live.buffers()]}
    clone = _clone_structure(live, memo)
    assert clone is not None and clone.again is clone.a and clone.a is not live.a
    assert clone.tmp is memo[id(live.tmp)] and "tmp" in clone._non_persistent_buffers_set
    clone.sizes.append(5)
    clone._non_persistent_buffers_set.add("x")
    assert live.sizes == [4, 4] and live._non_persistent_buffers_set == {"tmp"}
    live.a.register_forward_hook(lambda *a: None)  # a hook is not plain data: the caller deep-copies
    assert _clone_structure(live, memo) is None
    assert _clone_structure(Aliased(), {}) is None  # a list of modules outside _modules: deep copy


def test_a_module_with_load_hooks_is_built_through_load_state_dict(monkeypatch):
    model = _model(monkeypatch, "hooked", Hooked)
    before = Hooked.calls
    state = {k: torch.randn_like(v) for k, v in model.module.state_dict().items()}
    module = model.build_shadow(state)
    assert Hooked.calls > before  # its hook ran: it had its say in the load
    for k, t in module.state_dict().items():
        assert torch.equal(t, state[k])


def test_a_partial_write_is_completed(tmp_path):
    """Piece files are written unbuffered (one syscall a piece): a short write goes on until done."""
    from ringserve.paramserver.store import _write_all

    class Short:
        def __init__(self):
            self.got = bytearray()

        def write(self, b):
            self.got += bytes(memoryview(b)[:1000])
            return min(1000, len(b))

    data = np.arange(10_000, dtype=np.float32)
    f = Short()
    _write_all(f, memoryview(data).cast("B"))
    assert bytes(f.got) == data.tobytes()
    store = ShardStore(tmp_path / "d")
    out = store.write_files("m", {"blake3-" + "0" * 64: data})
    assert out["pieces"] == 1 and out["bytes"] == data.nbytes
    assert (tmp_path / "d" / "m" / "pieces" / ("blake3-" + "0" * 64)).read_bytes() == data.tobytes()


def _slice(version: int, arr: np.ndarray) -> Slice:
    sl = Slice(version, digest=f"d{version}")
    p = Piece("w", "w", arr.dtype.name, tuple(arr.shape), 0, arr.size)
    sl.pieces["w"], sl.data["w"], sl.checksums["w"] = p, arr, checksum(memoryview(arr).cast("B"))
    return sl


def test_a_commit_renames_the_manifest_its_stage_wrote_and_syncs_the_directory_once(tmp_path, monkeypatch):
    store = ShardStore(tmp_path / "d")
    sl = _slice(1, np.arange(1000, dtype=np.float32))
    written = store.write_files("m", store.unstored("m", sl), "t1")
    store.note_written("m", store.unstored("m", sl))
    written["manifest_tmp"] = store.write_staged_manifest("m", sl, "t1")
    assert not (tmp_path / "d" / "m" / "v1.manifest.json").exists()  # no version exists by a staged manifest
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    store.commit("m", sl, written, epoch=5)
    # current.json (its temporary file) and the model's directory, once: the manifest only moved
    assert sorted(os.path.basename(p) for p in synced) == ["current.json.tmp", "m"]
    assert (tmp_path / "d" / "m" / "v1.manifest.json").exists() and not os.path.exists(written["manifest_tmp"])
    again = ShardStore(tmp_path / "d")
    again.load_all()
    assert again.current["m"] == 1 and np.array_equal(again.slices["m"][1].data["w"].view(np.float32), sl.data["w"])


def test_a_stage_writes_its_pieces_and_manifest_in_one_pass_each_durable_in_order(tmp_path, monkeypatch):
    """write_stage (sixth round): the manifest is written before the pieces' fsyncs and fsynced after
    their renames; every piece is fsynced before its rename, the pieces' directory after them."""
    store = ShardStore(tmp_path / "d")
    sl = _slice(1, np.arange(1000, dtype=np.float32))
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.basename(
        os.readlink(f"/proc/self/fd/{fd}")))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", os.path.basename(str(b)))),
                                                     real_replace(a, b)))
    written = store.write_stage("m", store.unstored("m", sl), "t1", sl)
    monkeypatch.undo()
    c = sl.checksums["w"]
    manifest = os.path.basename(written["manifest_tmp"])
    assert events == [("fsync", f"{c}.t1.tmp"), ("rename", c), ("fsync", manifest), ("fsync", "pieces")]
    assert written["pieces"] == 1 and written["bytes"] == 4000 and os.path.exists(written["manifest_tmp"])
    store.note_written("m", store.unstored("m", sl))
    store.commit("m", sl, written, epoch=5)
    again = ShardStore(tmp_path / "d")
    again.load_all()
    assert again.current["m"] == 1 and np.array_equal(again.slices["m"][1].data["w"].view(np.float32), sl.data["w"])
    replicated = ShardStore(tmp_path / "r", fsync=False)  # --durability replicated: only the manifest is fsynced
    events.clear()
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    out = replicated.write_stage("m", replicated.unstored("m", sl), "t2", sl)
    assert events == [os.path.basename(out["manifest_tmp"])]


def test_a_commit_without_a_staged_manifest_writes_one(tmp_path):
    store = ShardStore(tmp_path / "d")
    sl = _slice(1, np.ones(10, dtype=np.float32))
    store.commit("m", sl, {"manifest_tmp": str(tmp_path / "d" / "m" / "v1.manifest.json.gone.tmp")})
    again = ShardStore(tmp_path / "d")
    again.load_all()
    assert again.current["m"] == 1


def test_staged_manifests_of_stages_gone_are_collected_and_a_start_drops_leftovers(tmp_path):
    store = ShardStore(tmp_path / "d")
    live, dead = store.write_staged_manifest("m", _slice(2, np.ones(4, np.float32)), "live00"), \
        store.write_staged_manifest("m", _slice(3, np.ones(4, np.float32)), "dead00")
    store.pinned_tags = lambda model: {"live00"}
    store.collect("m")
    assert os.path.exists(live) and not os.path.exists(dead)
    with pytest.raises(ValueError):
        store.write_staged_manifest("m", _slice(4, np.ones(4, np.float32)), "../x")
    ShardStore(tmp_path / "d").load_all()  # a start: nothing staged survives it
    assert not os.path.exists(live)
