"""Models loaded on demand (--max-models): first request loads from the shards, LRU eviction,
the master routes to workers that hold a model first, then to those with room."""
from __future__ import annotations

from concurrent.futures import wait

import numpy as np
import pytest
import torch

from ringserve.client import Client, RingserveError
from ringserve.client.admin import AdminClient
from ringserve.client.params import ParamClient
from ringserve.launch.procs import wait_until
from ringserve.worker import demo
from ringserve.worker.batching import Batcher, WorkItem

pytestmark = pytest.mark.timeout(150)
X = {"mlp": ("x", (1, 256)), "cnn": ("image", (1, 1, 28, 28))}


def inputs(model: str) -> dict:
    name, shape = X[model]
    return {name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}


def expected(model: str, seed: int) -> np.ndarray:
    m = getattr(demo, model)(seed=seed).eval()
    with torch.inference_mode():
        return m(**{k: torch.from_numpy(v) for k, v in inputs(model).items()})["logits"].numpy()


def test_batcher_holds_groups_of_a_model_that_is_not_loaded():
    b = Batcher(8, 0.0)
    item = lambda rid, model: WorkItem(rid, 1, model, None, {"x": np.ones((1, 2), np.float32)}, 1, 0.0, 10.0)  # noqa
    b.add(item("a", "cold"))
    b.add(item("b", "warm"))
    batch, _ = b.next_batch(1.0, runnable=lambda m: m == "warm")
    assert [i.rid for i in batch] == ["b"] and b.waiting("cold") and not b.waiting("warm")
    assert b.next_batch(1.0, runnable=lambda m: False) == ([], None)
    assert [i.rid for i in b.take_expired(11.0)] == ["a"]  # a load that takes too long: TIMEOUT


def test_first_request_loads_the_lru_is_evicted_and_nothing_is_lost(cluster):
    eps = cluster.start_shards(2)
    cluster.start_master()
    with ParamClient(eps) as pc:
        for model in ("mlp", "cnn"):
            assert pc.publish(model, getattr(demo, model)(seed=5).state_dict()) == 1
    cluster.start_workers(1, "--paramservers", ",".join(f"{n}={e}" for n, e in eps.items()), "--max-models", "1",
                          "--model", "cnn=ringserve.worker.demo:cnn", wait=False)
    admin = AdminClient(cluster.admin)
    wait_until(lambda: len(admin.status()["workers"]) == 1, 60)
    models = admin.status()["workers"][0]["models"]
    assert models["mlp"]["on_demand"] and not models["mlp"]["ready"] and not models["cnn"]["ready"]

    def held():
        w = admin.status()["workers"][0]
        return {m for m, i in w["models"].items() if i["ready"]}, w["stats"]

    with Client(cluster.frontend, timeout=30) as c:
        for model in ("mlp", "cnn", "mlp"):
            reply = c.infer_async(model, inputs(model)).result(timeout=30)
            assert reply.version == 1
            np.testing.assert_allclose(reply.outputs["logits"], expected(model, 5), rtol=1e-4, atol=1e-5)
            assert wait_until(lambda model=model: held()[0] == {model}, 10)  # at most one loaded: the other was evicted
        stats = held()[1]
        assert stats["model_loads"] == 3 and stats["model_evictions"] == 2 and stats["max_models"] == 1

        # Both models asked for at once, over and over: each request gets exactly one answer.
        futs = [c.infer_async(m, inputs(m), timeout=20) for _ in range(20) for m in ("mlp", "cnn")]
        done, not_done = wait(futs, timeout=60)
        assert not not_done
        ok = sum(1 for f in done if f.exception() is None)
        assert ok + sum(1 for f in done if isinstance(f.exception(), RingserveError)) == 40 and ok >= 30


def test_an_on_demand_model_whose_weights_are_refused_is_answered_at_once(cluster):
    """Issue 16 item 6: the worker's refusal reaches the master, so a request gets a clear error
    now instead of waiting its whole deadline (and the master keeps no slot for it)."""
    eps = cluster.start_shards(2)
    cluster.start_master()
    with ParamClient(eps) as pc:  # the CNN's weights published under the MLP's name: no MLP can load them
        assert pc.publish("mlp", demo.cnn(seed=1).state_dict()) == 1
    cluster.start_workers(1, "--paramservers", ",".join(f"{n}={e}" for n, e in eps.items()), "--max-models", "1",
                          wait=False)
    admin = AdminClient(cluster.admin)
    wait_until(lambda: len(admin.status()["workers"]) == 1, 60)
    with Client(cluster.frontend, timeout=20) as c:
        for _ in range(3):  # the first asks for the load; later ones find it refused already
            t0 = __import__("time").monotonic()
            with pytest.raises(RingserveError) as err:
                c.infer("mlp", inputs("mlp"), timeout=20)
            assert "could not be loaded" in str(err.value) and "refused" in str(err.value), err.value
            assert __import__("time").monotonic() - t0 < 10  # far inside the 20 s deadline
    cluster.check_books()
