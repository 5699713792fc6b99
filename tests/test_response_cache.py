"""Issue 22, the response cache: answers of models marked cache=true come from the master, keyed by
the version that would serve the request, so a publish or a rollback invalidates by construction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.client.params import ParamClient
from ringserve.launch.procs import wait_for_workers, wait_until
from ringserve.master.cache import EXACT_MAX, ResponseCache, input_digest
from ringserve.protocol.codec import pack
from ringserve.worker import demo

pytestmark = pytest.mark.timeout(150)


def expected(seed: int, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return demo.mlp(seed=seed).eval()(torch.from_numpy(x))["logits"].numpy()


def test_the_cache_stays_within_its_bytes_and_keys_by_every_input_byte():
    c = ResponseCache(max_bytes=10_000)
    for i in range(100):
        c.put(("m", 1, bytes([i])), {"ok": True}, [b"\0" * 1000])
        assert c.bytes <= 10_000
    assert c.evictions > 0 and c.get(("m", 1, bytes([99]))) is not None and c.get(("m", 1, bytes([0]))) is None
    c.put(("m", 1, b"huge"), {"ok": True}, [b"\0" * 20_000])  # bigger than the budget: not kept
    assert c.get(("m", 1, b"huge")) is None
    a = input_digest([["x", "float32", [1, 2], b"\0" * 8]], [])
    assert a == input_digest([["x", "float32", [1, 2]]], [b"\0" * 8])  # inline or framed: the same input
    assert a != input_digest([["x", "float32", [2, 1], b"\0" * 8]], [])  # the shape counts
    assert a != input_digest([["y", "float32", [1, 2], b"\0" * 8]], [])  # and the name
    assert a != input_digest([["x", "int32", [1, 2], b"\0" * 8]], [])  # and the dtype


def test_small_inputs_key_by_their_exact_form_large_ones_by_a_marked_digest_inline_or_framed_alike():
    """Up to EXACT_MAX bytes the key is the inputs' msgpack form itself (the dict compares every byte:
    no hash collision can serve another input's answer); above it b"\\0" + blake2b-160, never equal to
    a form. Inline or in a frame (bytes or a zmq.Frame), on either side of the bound: the same key."""
    import zmq
    small = [["x", "float32", [1, 256], b"\1" * 1024]]
    assert input_digest(small, []) == pack(small)  # the exact form, no hash
    for n in (EXACT_MAX - 40, EXACT_MAX - 21, EXACT_MAX - 20, EXACT_MAX - 19, EXACT_MAX, 3 * EXACT_MAX):
        data = bytes(range(256)) * (n // 256) + b"\7" * (n % 256)
        inline = [["a", "uint8", [len(data)], data], ["b", "int8", [2], b"\0\1"]]
        framed = [["a", "uint8", [len(data)]], ["b", "int8", [2], b"\0\1"]]
        key = input_digest(inline, [])
        assert key == input_digest(framed, [data]) == input_digest(framed, [zmq.Frame(data)])
        if len(pack(inline)) <= EXACT_MAX:
            assert key == pack(inline)
        else:
            assert len(key) == 21 and key[:1] == b"\0"  # a form starts with 0x9_ or 0xdc: never this
        changed = [["a", "uint8", [len(data)], data[:-1] + b"\x08"], inline[1]]
        assert input_digest(changed, []) != key  # every byte counts, either kind
    c = ResponseCache(max_bytes=1 << 20)
    c.put(("m", 1, b"k"), {"ok": True}, [])
    one = c.bytes
    c.put(("m", 1, b"k" * 3001), {"ok": True}, [])
    assert c.bytes - one == one + 3000  # a key's bytes count in the bound


def test_hits_come_from_the_master_and_a_publish_or_rollback_never_returns_an_old_answer(cluster):
    eps = cluster.start_shards(1)
    cluster.start_master("--response-cache-bytes", "60000")
    shards = ",".join(f"{n}={e}" for n, e in eps.items())
    with ParamClient(eps) as pc:
        assert pc.publish("mlp", demo.mlp(seed=1).state_dict()) == 1
        cluster.start_workers(1, "--paramservers", shards, "--keep-versions", "2",
                              model="mlp=ringserve.worker.demo:mlp,cache=true", wait=False)
        wait_for_workers(cluster.admin, 1, timeout=60, model="mlp", version=1)
        admin = AdminClient(cluster.admin)
        x = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
        with Client(cluster.frontend, timeout=20) as c:
            first = c.infer_async("mlp", {"x": x}).result()
            again = c.infer_async("mlp", {"x": x}).result()
            assert "cached" not in first.header and again.header.get("cached") is True
            np.testing.assert_array_equal(first.outputs["logits"], again.outputs["logits"])
            np.testing.assert_allclose(again.outputs["logits"], expected(1, x), rtol=1e-4, atol=1e-5)
            assert again.version == 1 and again.id != first.id
            assert admin.status()["workers"][0]["done"] == 1  # the hit never reached the worker

            assert pc.publish("mlp", demo.mlp(seed=2).state_dict(), allow_layout_change=True) == 2
            wait_for_workers(cluster.admin, 1, timeout=60, model="mlp", version=2)
            v2 = c.infer_async("mlp", {"x": x}).result()
            assert "cached" not in v2.header and v2.version == 2
            np.testing.assert_allclose(v2.outputs["logits"], expected(2, x), rtol=1e-4, atol=1e-5)
            pinned = c.infer_async("mlp", {"x": x}, version=1).result()  # a pin hits only its own version
            assert pinned.header.get("cached") is True and pinned.version == 1
            np.testing.assert_allclose(pinned.outputs["logits"], expected(1, x), rtol=1e-4, atol=1e-5)

            pc.rollback("mlp", 1)
            wait_until(lambda: admin.status()["workers"][0]["models"]["mlp"]["version"] == 1, 30)
            back = c.infer_async("mlp", {"x": x}).result()
            assert back.version == 1
            np.testing.assert_allclose(back.outputs["logits"], expected(1, x), rtol=1e-4, atol=1e-5)

            rng = np.random.default_rng(1)  # churn: the cache's bytes stay under the bound
            futs = [c.infer_async("mlp", {"x": rng.standard_normal((1, 256), dtype=np.float32)}) for _ in range(300)]
            for f in futs:
                f.result()
        st = admin.status()["response_cache"]
        assert st["bytes"] <= 60_000 and st["evictions"] > 0 and st["hits"] >= 2, st
    cluster.check_books()


def test_a_model_not_marked_cache_is_never_served_from_the_cache(cluster):
    cluster.start_master()
    cluster.start_workers(1)
    x = np.ones((1, 256), np.float32)
    with Client(cluster.frontend, timeout=20) as c:
        replies = [c.infer_async("mlp", {"x": x}).result() for _ in range(3)]
    assert all("cached" not in r.header for r in replies)
    assert AdminClient(cluster.admin).status()["response_cache"]["hits"] == 0
