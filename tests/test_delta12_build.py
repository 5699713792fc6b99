"""Issue 22, tenth round: a delta's fixed cost on a worker.

A delta's module is built from the served one (worker/loader.py `_with_tensors`): a tensor the
weight sync gives again as the very same object (the held array it shares, `Held.tensors`) keeps
the served module's own tensor, and a submodule none of whose tensors changes is shared whole,
read-only; everything else is built anew, and the served module is never touched. A delta's plan
(worker/sync.py `plan_version`) takes the held version's checked manifest entries for the entries
equal to them, type for type, and parses every other one as before."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ringserve.worker.demo as demo_mod
import ringserve.worker.sync as sync_mod
from ringserve.worker.loader import ServedModel, parse_model_arg
from ringserve.worker.sync import Held, plan_version

pytestmark = pytest.mark.timeout(60)


def _stack() -> ServedModel:
    return ServedModel(parse_model_arg("big=ringserve.worker.demo:stack,arg.layers=3,arg.width=8"),
                       torch.device("cpu"))


def _versions(model: ServedModel):
    """v1 (every tensor new) installed, and v2 = v1 with one layer's weight changed."""
    v1 = {k: torch.randn_like(v) for k, v in model.module.state_dict().items()}
    m1 = model.build_shadow(v1, 1)
    model.install(m1, 1)
    v2 = dict(v1)
    v2["layers.0.weight"] = torch.randn_like(v1["layers.0.weight"])
    return v1, m1, v2


def test_a_delta_shares_the_unchanged_layers_and_builds_the_changed_one():
    model = _stack()
    v1, m1, v2 = _versions(model)
    m2 = model.build_shadow(v2, 2)
    assert m2 is not m1 and m2.layers is not m1.layers and m2.layers[0] is not m1.layers[0]
    assert m2.layers[1] is m1.layers[1] and m2.layers[2] is m1.layers[2]  # unchanged: shared whole
    assert m2.layers[0].bias is m1.layers[0].bias  # an unchanged tensor of a changed layer: the served one
    assert m2.layers[0].weight.data_ptr() == v2["layers.0.weight"].data_ptr()
    assert isinstance(m2.layers[0].weight, torch.nn.Parameter)
    x = torch.randn(2, 8)
    torch.testing.assert_close(m2(x)["y"], torch.func.functional_call(m1, v2, x)["y"])
    torch.testing.assert_close(m1(x)["y"], torch.func.functional_call(m1, v1, x)["y"])  # v1 still serves v1
    for k, t in m1.state_dict().items():
        assert t.data_ptr() == v1[k].data_ptr()  # the served module is untouched
    model.install(m2, 2)
    v3 = dict(v2)
    v3["layers.2.bias"] = torch.randn_like(v2["layers.2.bias"])
    m3 = model.build_shadow(v3, 3)  # built from v2's module: its shares carry on
    assert m3.layers[0] is m2.layers[0] and m3.layers[1] is m1.layers[1] and m3.layers[2] is not m1.layers[2]
    assert m3.layers[2].weight is m1.layers[2].weight
    torch.testing.assert_close(m3(x)["y"], torch.func.functional_call(m1, v3, x)["y"])


def test_only_the_very_same_tensor_object_is_kept_equal_values_are_built_anew():
    model = _stack()
    v1, m1, _ = _versions(model)
    copies = {k: v.clone() for k, v in v1.items()}  # equal values, other objects (other memory)
    m2 = model.build_shadow(copies, 2)
    for new, old in zip(m2.modules(), m1.modules(), strict=True):
        assert new is not old
    for k, t in m2.state_dict().items():
        assert t.data_ptr() == copies[k].data_ptr()


class Peer(torch.nn.Module):
    """A submodule whose forward reads another module through a plain attribute (not registered)."""

    def __init__(self, other: torch.nn.Module):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.refs = [other]

    def forward(self, x):
        return self.refs[0](self.lin(x))


class WithPeer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, 4)
        self.body = Peer(self.head)

    def forward(self, x):
        return {"y": self.body(x)}


def test_a_submodule_that_refers_to_another_module_is_never_shared(monkeypatch):
    """`body` keeps none of its own tensors changed but reads `head` (changed) through a list: shared,
    it would serve the old head. It is copied (deep copy) and reads the new one."""
    monkeypatch.setattr(demo_mod, "with_peer", WithPeer, raising=False)
    model = ServedModel(parse_model_arg("p=ringserve.worker.demo:with_peer"), torch.device("cpu"))
    v1 = {k: torch.randn_like(v) for k, v in model.module.state_dict().items()}
    m1 = model.build_shadow(v1, 1)
    model.install(m1, 1)
    v2 = dict(v1)
    v2["head.weight"] = torch.randn_like(v1["head.weight"])
    m2 = model.build_shadow(v2, 2)
    assert m2.body is not m1.body and m2.body.refs[0] is m2.head
    x = torch.randn(3, 4)
    expected = torch.nn.functional.linear(torch.nn.functional.linear(x, v2["body.lin.weight"], v2["body.lin.bias"]),
                                          v2["head.weight"], v2["head.bias"])
    torch.testing.assert_close(m2(x)["y"], expected)


def _manifests():
    a = ["a", "a", "float32", [4], 0, 4, "0" * 64]
    b0, b1 = ["b#0", "b", "float32", [2, 4], 0, 4, "1" * 64], ["b#1", "b", "float32", [2, 4], 4, 8, "2" * 64]
    return {"s0": [a, b0], "s1": [list(a), b1], "s2": [list(b0), list(b1)]}


def test_a_plan_takes_the_held_entries_and_parses_only_the_others(monkeypatch):
    first, _ = plan_version(_manifests(), None)
    held = Held()
    held.entries, held.counts = first.entries, {}  # counts unknown: every tensor checked again
    held.flat = {"a": np.zeros(4, np.float32), "b": np.zeros(8, np.float32)}
    held.shapes = {"a": (4,), "b": (2, 4)}
    parsed = []
    real = sync_mod._item
    monkeypatch.setattr(sync_mod, "_item", lambda item: parsed.append(item[0]) or real(item))
    again = _manifests()
    new, need = plan_version(again, held)
    assert parsed == [] and sum(map(len, need.values())) == 0 and new.flat["b"] is held.flat["b"]
    assert new.sources == first.sources
    changed = _manifests()
    for shard in ("s0", "s2"):
        changed[shard][1 if shard == "s0" else 0][6] = "3" * 64
    new, need = plan_version(changed, held)
    assert parsed == ["b#0"] and [p.key for items in need.values() for p, _ in items] == ["b#0"]
    parsed.clear()
    typed = _manifests()
    typed["s0"][0][4] = 0.0  # equal in value, not in type: parsed as any new entry, as without a held version
    new, need = plan_version(typed, held)
    assert "a" in parsed and new.sources == plan_version(_manifests(), None)[0].sources
    twice = _manifests()
    twice["s0"].append(list(twice["s0"][0]))  # one shard listing a held piece twice is still refused
    with pytest.raises(ValueError, match="twice"):
        plan_version(twice, held)
    bad = _manifests()
    bad["s1"][0] = ["a", "a", "float32", [4], 0, 4, "9" * 64]  # another owner's other content: refused
    with pytest.raises(ValueError):
        plan_version(bad, held)
    held.counts = first.counts
    short = _manifests()
    short["s1"].remove(short["s1"][1])  # b#1 listed by nobody: b's held entries alone do not tile it
    short["s2"].remove(short["s2"][1])
    with pytest.raises(ValueError, match="do not cover"):
        plan_version(short, held)
    new, _ = plan_version(_manifests(), held)
    assert new.flat["b"] is held.flat["b"] and new.counts == {"a": 1, "b": 2}


def test_a_version_sharing_an_array_gives_the_same_tensor_object():
    first, _ = plan_version(_manifests(), None)
    first.flat = {"a": np.arange(4, dtype=np.float32), "b": np.arange(8, dtype=np.float32)}
    t1 = first.tensors()
    changed = _manifests()
    changed["s0"][1][6] = changed["s2"][0][6] = "3" * 64
    new, need = plan_version(changed, first)
    new.flat["b"][:4] = 7  # what the fetch would write into the new array
    t2 = new.tensors()
    assert t2["a"] is t1["a"] and t2["b"] is not t1["b"] and tuple(t2["b"].shape) == (2, 4)
    assert new.tensors()["b"] is t2["b"]
