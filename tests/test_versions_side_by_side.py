"""A worker keeps earlier versions loaded (keep=N) and serves requests pinned to any of them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ringserve.worker import demo
from ringserve.worker.loader import ServedModel, parse_model_arg

pytestmark = pytest.mark.timeout(60)


def state(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in demo.mlp(seed=seed).state_dict().items()}


def expected(seed: int, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return demo.mlp(seed=seed).eval()(torch.from_numpy(x))["logits"].numpy()


def test_keep_holds_the_newest_versions_and_runs_each_by_its_own_weights():
    m = ServedModel(parse_model_arg("m=ringserve.worker.demo:mlp,keep=2"), torch.device("cpu"), wait_for_weights=True)
    x = np.random.default_rng(0).standard_normal((3, 256), dtype=np.float32)
    for v in (1, 2, 3):
        m.install(m.build_shadow(state(v)), v)
    assert m.versions() == [2, 3] and m.describe()["versions"] == [2, 3]
    assert m.holds(None) and m.holds(2) and m.holds(3) and not m.holds(1)
    np.testing.assert_allclose(m.run({"x": x})["logits"], expected(3, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.run({"x": x}, 2)["logits"], expected(2, x), rtol=1e-5, atol=1e-6)
    m.install(m.build_shadow(state(2)), 2)  # a rollback to a held version: 3 is kept, 2 is current
    assert m.version == 2 and m.versions() == [2, 3]
    np.testing.assert_allclose(m.run({"x": x}, 3)["logits"], expected(3, x), rtol=1e-5, atol=1e-6)


def test_default_keeps_one_version_only():
    m = ServedModel(parse_model_arg("m=ringserve.worker.demo:mlp"), torch.device("cpu"), wait_for_weights=True)
    m.install(m.build_shadow(state(1)), 1)
    m.install(m.build_shadow(state(2)), 2)
    assert m.versions() == [2] and "versions" not in m.describe() and not m.holds(1)
    with pytest.raises(ValueError, match="keep"):
        parse_model_arg("m=ringserve.worker.demo:mlp,keep=0")
