"""Building a new version's module off to the side (worker/loader.py `build_shadow`), issue 22
fifth round: the live module's structure is deep-copied with each live tensor mapped straight to
its replacement (no placeholders, no load_state_dict pass), and the load_state_dict route is kept
for modules that take part in loading themselves (load hooks, their own _load_from_state_dict).
Either way the new module serves exactly the new tensors and the live one is never touched."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ringserve.worker.demo as demo_mod
from ringserve.worker.loader import ServedModel, parse_model_arg
from ringserve.paramserver.store import ShardStore

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
