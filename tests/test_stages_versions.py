"""Stage state is built once per model version (issue 18): a version published to the shards is
swapped in with stages built for it, off to the side; a version whose stage factory fails is
refused whole (the publish is reverted, the old version keeps serving with its own stages); and
while versions change under load, every answer is tokenized, computed and pooled by one version."""
from __future__ import annotations

import textwrap
import threading
import time

import numpy as np
import pytest
import torch
import zmq

from ringserve.client import Client
from ringserve.client.admin import AdminClient
from ringserve.client.params import ParamClient, PublishRefused
from ringserve.launch.procs import wait_for_workers, wait_until
from ringserve.worker.batching import Batcher, WorkItem
from ringserve.worker.compute import MAX_RESTAGED, ComputeThread
from ringserve.worker.loader import ServedModel, StageBuildError, parse_model_arg
from ringserve.worker.stages import PRE, StagePool, Task
from helpers import shard_list

pytestmark = pytest.mark.timeout(180)

VSTAGES = textwrap.dedent('''
    import time

    import numpy as np
    import torch


    class Scale(torch.nn.Module):
        """y = x * w: published weights w = [version, 1] make the version visible in the answer."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.input_spec = {"x": ((None, 2), "float32")}

        def forward(self, x):
            return {"y": x * self.w}


    def scale():
        return Scale()


    def tag(version):
        return -1.0 if version is None else float(version)


    def tokenizer(version=None):
        """Its state records the version it was built for; version 13 cannot be built."""
        if version == 13:
            raise RuntimeError("no vocabulary for version 13")
        mine = tag(version)

        def tokenize(inputs):
            time.sleep(0.002)  # a tokenizer takes a while: requests are in the stages when a version swaps in
            return {"x": np.array([[float(len(t)), mine] for t in inputs["text"]], np.float32)}

        tokenize.input_spec = {"text": ((None,), "bytes")}
        return tokenize


    def pooling(version=None):
        mine = tag(version)

        def pool(outputs, inputs):
            rows = len(inputs["x"])
            return {"y": outputs["y"], "pre": inputs["x"][:, 1].copy(), "post": np.full(rows, mine, np.float32)}

        return pool
''')

SPEC = "vs=vstages:scale,preprocess=vstages:tokenizer,postprocess=vstages:pooling"


@pytest.fixture
def vstages(tmp_path, monkeypatch):
    (tmp_path / "vstages.py").write_text(VSTAGES)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import vstages as mod  # noqa: PLC0415 - written by this fixture

    return importlib.reload(mod)


def weights(version: int) -> dict[str, np.ndarray]:
    return {"w": np.array([float(version), 1.0], np.float32)}


def check_one_version(reply, text: str) -> int:
    """Every part of the answer comes from the version the reply names; returns it."""
    v = reply.header["version"]
    out = reply.outputs
    assert out["pre"].tolist() == [v] and out["post"].tolist() == [v], (v, out)
    assert out["y"].tolist() == [[len(text) * v, v]], (v, out)
    return v


def test_stages_are_built_per_version_and_kept_beside_it(vstages):
    m = ServedModel(parse_model_arg(SPEC + ",keep=2"), torch.device("cpu"), version=1)
    assert m.stages.version == 1
    for v in (2, 3):
        m.install(m.build_shadow({"w": torch.tensor([float(v), 1.0])}, v), v)
    assert m.stages.version == 3 and m.stages_for(None).version == 3
    assert m.stages_for(2).version == 2 and m.stages_for(2) is m.older_stages[2]
    assert m.stages_for(1).version == 3  # not held: the current stages (the batch answers UNKNOWN_VERSION)
    x = m.stages_for(2).pre({"text": np.array([b"abc"], dtype=object)})
    assert x["x"].tolist() == [[3.0, 2.0]]
    with pytest.raises(StageBuildError, match="cannot build preprocess vstages:tokenizer for version 13"):
        m.build_shadow({"w": torch.tensor([13.0, 1.0])}, 13)
    assert m.version == 3 and m.stages.version == 3  # nothing live was touched
    m.install(m.build_shadow({"w": torch.tensor([4.0, 1.0])}), 4)  # built without its version: built at install
    assert m.stages.version == 4 and sorted(m.older_stages) == [3]


def test_a_request_tokenized_by_a_version_swapped_out_is_tokenized_again(vstages):
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://restage")
    m = ServedModel(parse_model_arg(SPEC), torch.device("cpu"), version=1)
    ct = ComputeThread(ctx, "inproc://restage", {"vs": m}, Batcher(32, 0.0))
    ct.stages = StagePool(ctx, "inproc://restage", 1, ct.metrics, lambda item: ct.inbox.put_ready([item]))
    ct.stages.start()
    ct.push = ctx.socket(zmq.PUSH)
    ct.push.connect("inproc://restage")
    try:
        item = WorkItem("k1", 1, "vs", None, {"text": np.array([b"abc"], dtype=object)}, 1, 0.0, time.monotonic() + 30)
        ct.stages.submit(Task(PRE, m, item))
        (ready,) = ct.inbox.get(timeout=10)
        assert ready is item and item.stage_version == 1 and item.inputs["x"].tolist() == [[3.0, 1.0]]
        m.install(m.build_shadow({"w": torch.tensor([2.0, 1.0])}, 2), 2)  # keep=1: version 1 is gone
        ct._run_batch([item])  # not run on version 2 with version 1's tokens: back to the stages
        (again,) = ct.inbox.get(timeout=10)
        assert again is item and item.stage_version == 2 and item.inputs["x"].tolist() == [[3.0, 2.0]]
        assert item.restaged == 1 and not pull.poll(0)  # nothing answered yet
        item.restaged, item.stage_version = MAX_RESTAGED, 1  # a request that kept missing its version
        ct._run_batch([item])
        assert pull.poll(5000) and b"changed version" in b"".join(pull.recv_multipart())
    finally:
        ct.stages.stop()
        for sock in (ct.push, pull):
            sock.close(linger=0)
        ctx.term()


def test_a_published_version_serves_with_its_own_stages_and_a_bad_one_is_refused(cluster, vstages):
    eps = cluster.start_shards(2)
    cluster.start_master()
    with ParamClient(eps) as pc:
        assert pc.publish("vs", weights(1), version=1) == 1
        cluster.start_workers(1, "--paramservers", shard_list(eps), wait=False, model=SPEC)
        wait_for_workers(cluster.admin, 1, 60, model="vs", version=1)
        with Client(cluster.frontend, timeout=20) as c:
            assert check_one_version(c.infer_async("vs", {"text": ["hello"]}).result(timeout=20), "hello") == 1

            # Requests keep flowing while version 2 is published and swapped in.
            seen, errors, stop = [], [], threading.Event()

            def load():
                k = 0
                deadline = time.monotonic() + 60
                while not stop.is_set() and time.monotonic() < deadline:
                    texts = [f"t{k + j}" * (1 + (k + j) % 5) for j in range(8)]
                    k += 8
                    futures = [c.infer_async("vs", {"text": [t]}) for t in texts]
                    for t, f in zip(texts, futures, strict=True):
                        try:
                            seen.append(check_one_version(f.result(timeout=20), t))
                        except Exception as exc:  # noqa: BLE001 - reported below
                            errors.append(repr(exc))

            thread = threading.Thread(target=load, daemon=True)
            thread.start()
            try:
                wait_until(lambda: len(seen) >= 16, 30, what="answers before the publish")
                assert pc.publish("vs", weights(2), version=2) == 2
                wait_for_workers(cluster.admin, 1, 30, model="vs", version=2)
                n = len(seen)
                wait_until(lambda: len(seen) >= n + 16, 30, what="answers after the swap")
            finally:
                stop.set()
                thread.join(30)
            assert not errors, errors[:5]
            assert seen[0] == 1 and seen[-1] == 2 and set(seen) <= {1, 2}

            after = c.infer_async("vs", {"text": ["world"]}).result(timeout=20)
            assert check_one_version(after, "world") == 2

            # Version 13's stages cannot be built: refused whole, reverted, and 2 keeps serving with its stages.
            with pytest.raises(PublishRefused):
                pc.publish("vs", weights(13), version=13)
            for text in ("still", "two"):
                assert check_one_version(c.infer_async("vs", {"text": [text]}).result(timeout=20), text) == 2
        log = cluster.workers[0].log_path.read_text()
        assert "weights_refused" in log and "cannot build preprocess vstages:tokenizer for version 13" in log
        info = AdminClient(cluster.admin).status()["workers"][0]["models"]["vs"]
        assert info["version"] == 2 and info["ready"] is True
    cluster.check_books()
