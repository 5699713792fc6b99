"""Dynamic batching, precision and device paths of the worker runtime, on real processes."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.launch.procs import wait_until
from ringserve.worker import demo
from ringserve.worker.loader import ServedModel, parse_model_arg

pytestmark = pytest.mark.timeout(120)


def reference(model, name, x):
    with torch.inference_mode():
        return model.eval()(**{name: torch.from_numpy(x)})["logits"].numpy()


@pytest.mark.parametrize("spec,name,shape", [("mlp=ringserve.worker.demo:mlp", "x", (256,)),
                                             ("cnn=ringserve.worker.demo:cnn", "image", (1, 28, 28))])
def test_batched_equals_unbatched(cluster, spec, name, shape):
    cluster.start_master()
    cluster.start_workers(1, "--max-batch-size", "16", "--max-queue-delay-us", "20000", model=spec)
    model = spec.split("=")[0]
    rng = np.random.default_rng(3)
    sizes = [1, 3, 1, 2, 1, 5, 1, 1, 4, 1]  # requests of 1 and of several rows, mixed
    xs = [rng.standard_normal((n, *shape), dtype=np.float32) for n in sizes]
    with Client(cluster.frontend, timeout=10) as c:
        replies = [f.result() for f in [c.infer_async(model, {name: x}) for x in xs]]
    ref = getattr(demo, model)()
    assert max(r.header["batch_rows"] for r in replies) > 1  # some did share a batch
    for x, r in zip(xs, replies):
        np.testing.assert_allclose(r.outputs["logits"], reference(ref, name, x), rtol=1e-4, atol=1e-5)


def test_batches_fill_but_never_exceed_max(cluster):
    cluster.start_master()
    cluster.start_workers(1, "--max-batch-size", "8", "--max-queue-delay-us", "5000", model="echo=ringserve.worker.demo:noop")
    with Client(cluster.frontend, timeout=10) as c:
        futures = [c.infer_async("echo", {"x": np.full((1, 4), i, np.float32)}) for i in range(64)]
        for i, f in enumerate(futures):
            reply = f.result()
            assert reply.outputs["y"][0, 0] == i and reply.header["batch_rows"] <= 8
    admin = AdminClient(cluster.admin)
    stats = wait_until(lambda: (s := admin.status()["workers"][0]["stats"]).get("requests") == 64 and s, 5)
    assert 1 < stats["max_batch_size_seen"] <= 8 and stats["mean_batch_size"] > 1


def test_lone_request_waits_only_max_queue_delay(cluster):
    delay = 0.3
    cluster.start_master()
    cluster.start_workers(1, "--max-batch-size", "64", "--max-queue-delay-us", str(delay * 1e6),
                          model="echo=ringserve.worker.demo:noop")
    with Client(cluster.frontend, timeout=10) as c:
        c.infer("echo", {"x": np.ones((1, 2), np.float32)})  # warm-up
        t0 = time.monotonic()
        c.infer("echo", {"x": np.ones((1, 2), np.float32)})
        took = time.monotonic() - t0
    assert delay * 0.9 <= took < delay + 1.0, took  # about the delay, not until 64 rows arrive


def test_different_trailing_shapes_never_share_a_batch(cluster):
    cluster.start_master()
    cluster.start_workers(1, "--max-batch-size", "32", "--max-queue-delay-us", "20000", model="echo=ringserve.worker.demo:noop")
    with Client(cluster.frontend, timeout=10) as c:
        xs = [np.full((1 + i % 2, 3 if i % 2 else 5), i, np.float32) for i in range(24)]
        replies = [f.result() for f in [c.infer_async("echo", {"x": x}) for x in xs]]
    for x, r in zip(xs, replies):
        np.testing.assert_array_equal(r.outputs["y"], x)
    rows3 = sum(x.shape[0] for x in xs if x.shape[1] == 3)
    assert all(r.header["batch_rows"] <= rows3 for r in replies)


@pytest.mark.parametrize("opts,tolerance", [("dtype=float16", 1e-2), ("dtype=bfloat16", 5e-2),
                                            ("quantize=int8", 5e-2)])
def test_reduced_precision_close_to_float32(opts, tolerance):
    """Tolerance: max |out - fp32| relative to max |fp32|, per mode (fp16 1%, bf16 and int8 5%)."""
    x = np.random.default_rng(4).standard_normal((16, 256), dtype=np.float32)
    ref = ServedModel(parse_model_arg("m=ringserve.worker.demo:mlp"), torch.device("cpu")).run({"x": x})["logits"]
    low = ServedModel(parse_model_arg(f"m=ringserve.worker.demo:mlp,{opts}"), torch.device("cpu"))
    out = low.run({"x": x.copy()})["logits"]
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() / np.abs(ref).max() < tolerance


def test_precision_is_per_model_and_shown_in_status(cluster):
    cluster.start_master()  # int8 runs on CPU only, so the worker stays on CPU on a GPU machine too
    cluster.start_workers(1, "--device", "cpu", "--model", "half=ringserve.worker.demo:mlp,dtype=float16", "--model",
                          "q8=ringserve.worker.demo:mlp,quantize=int8", model="full=ringserve.worker.demo:mlp")
    x = np.random.default_rng(5).standard_normal((4, 256), dtype=np.float32)
    with Client(cluster.frontend, timeout=10) as c:
        full = c.infer("full", {"x": x})["logits"]
        for name in ("half", "q8"):
            assert np.abs(c.infer(name, {"x": x})["logits"] - full).max() / np.abs(full).max() < 5e-2
    models = AdminClient(cluster.admin).status()["workers"][0]["models"]
    assert models["half"]["dtype"] == "float16" and models["q8"]["quantize"] == "int8"
    assert models["full"]["dtype"] == "float32" and models["full"]["quantize"] is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_matches_cpu(dtype):
    x = np.random.default_rng(6).standard_normal((8, 256), dtype=np.float32)
    cpu = ServedModel(parse_model_arg("m=ringserve.worker.demo:mlp"), torch.device("cpu")).run({"x": x})["logits"]
    gpu = ServedModel(parse_model_arg(f"m=ringserve.worker.demo:mlp,dtype={dtype}"), torch.device("cuda:0"))
    out = gpu.run({"x": x.copy()})["logits"]
    assert np.abs(out - cpu).max() / np.abs(cpu).max() < (1e-3 if dtype == "float32" else 5e-2)


@cuda
def test_cuda_worker_end_to_end(cluster):
    cluster.start_master()
    cluster.start_workers(1, "--device", "cuda:0", "--max-batch-size", "8", model="mlp=ringserve.worker.demo:mlp")
    x = np.random.default_rng(7).standard_normal((3, 256), dtype=np.float32)
    with Client(cluster.frontend, timeout=30) as c:
        out = c.infer("mlp", {"x": x})["logits"]
    np.testing.assert_allclose(out, reference(demo.mlp(), "x", x), rtol=1e-3, atol=1e-4)
    assert AdminClient(cluster.admin).status()["workers"][0]["device"] == "cuda:0"


def test_int8_refused_on_cuda_device_names_the_reason():
    with pytest.raises(ValueError, match="CPU only"):
        ServedModel(parse_model_arg("m=ringserve.worker.demo:mlp,quantize=int8"), torch.device("cuda:0"))
