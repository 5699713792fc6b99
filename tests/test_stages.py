"""Pre/post-processing stages through a real master and worker: text in, the model's answer out,
equal to the same steps run in-process, batched (ragged) and alone; per-stage timing in the reply
and the worker's metrics; a stage that raises, hangs past the deadline or returns the wrong type
fails only its own request, and the worker keeps serving."""
from __future__ import annotations

import textwrap
import time

import numpy as np
import pytest
import torch

from ringserve.client import BadRequest, Client
from ringserve.client.errors import Internal, Timeout
from ringserve.worker.loader import ModelLoadError, ModelOptions, parse_model_arg

pytestmark = pytest.mark.timeout(180)

TEXT_MODELS = textwrap.dedent('''
    import time

    import numpy as np
    import torch

    from ringserve.worker.loader import BadInput

    BUILT = []  # how many times each stage factory ran in this process


    class Bag(torch.nn.Module):
        """Token vectors (masked) of byte-level ids: a variable-length input, batched ragged."""

        def __init__(self, dim):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(258, dim)
            ragged = {"pad": 0, "mask": "attention_mask", "buckets": [8, 16, 32], "seq_outputs": ["tokens"]}
            self.input_spec = {"input_ids": ((None, None), "int64", ragged), "attention_mask": ((None, None), "int64")}

        def forward(self, input_ids, attention_mask):
            return {"tokens": self.emb(input_ids) * attention_mask.unsqueeze(-1)}


    def bag(dim=4):
        return Bag(dim)


    def tokenizer(offset=1):
        """A stage factory: its state (here `offset`) is built once per model version."""
        BUILT.append("pre")

        def tokenize(inputs):
            texts = [t.decode("utf-8") for t in inputs["text"].ravel()]  # not UTF-8: UnicodeDecodeError
            for t in texts:
                if t == "raise-bad":
                    raise BadInput("this text is not allowed")
                if t == "raise":
                    raise RuntimeError("the tokenizer broke")
                if t == "hang":
                    time.sleep(30)
                if t == "wrong":
                    return [1, 2, 3]
            ids = [[b + offset for b in t.encode()] or [offset] for t in texts]
            length = max(len(i) for i in ids)
            out = np.zeros((len(ids), length), np.int64)
            mask = np.zeros((len(ids), length), np.int64)
            for r, i in enumerate(ids):
                out[r, :len(i)], mask[r, :len(i)] = i, 1
            return {"input_ids": out, "attention_mask": mask}

        tokenize.input_spec = {"text": ((None,), "bytes")}
        return tokenize


    def pooling():
        BUILT.append("post")

        def pool(outputs, inputs):
            first = bytes(int(b) - 1 for b in inputs["input_ids"][0] if b > 0)
            if first == b"post-raise":
                raise ValueError("pooling broke")
            if first == b"post-wrong":
                return 5
            if first == b"post-hang":
                time.sleep(30)
            mask = inputs["attention_mask"][..., None].astype(np.float32)
            mean = (outputs["tokens"] * mask).sum(axis=1) / mask.sum(axis=1)
            return {"vector": mean / np.linalg.norm(mean, axis=1, keepdims=True),
                    "label": np.array([b"long" if m.sum() > 8 else b"short" for m in mask], dtype=object)}

        return pool
''')

SPEC = "txt=textmodels:bag,arg.dim=4,preprocess=textmodels:tokenizer,postprocess=textmodels:pooling"


@pytest.fixture
def textmodels(tmp_path, monkeypatch):
    (tmp_path / "textmodels.py").write_text(TEXT_MODELS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import textmodels as mod  # noqa: PLC0415 - written by this fixture

    return importlib.reload(mod)


def in_process(mod, texts: list[str]) -> dict[str, np.ndarray]:
    """The same three steps, run here on one request."""
    x = mod.tokenizer()({"text": np.array([t.encode() for t in texts], dtype=object)})
    with torch.inference_mode():
        tokens = mod.bag(4).eval()(**{k: torch.from_numpy(v) for k, v in x.items()})["tokens"].numpy()
    return mod.pooling()({"tokens": tokens}, x)


def test_spec_parses_stages_and_builds_them_once():
    opts = parse_model_arg("m=a.b:c,preprocess=x.y:tok,postprocess=x.y:pool,arg.path=/m")
    assert (opts.preprocess, opts.postprocess, opts.kwargs) == ("x.y:tok", "x.y:pool", {"path": "/m"})
    with pytest.raises(ValueError, match="module:function"):
        parse_model_arg("m=a.b:c,preprocess=tok")


def test_a_stage_factory_that_fails_stops_the_worker_in_one_line(textmodels):
    from ringserve.worker.loader import ServedModel

    opts = ModelOptions("txt", "textmodels:bag", preprocess="textmodels:nothing")
    with pytest.raises(ModelLoadError, match="cannot build preprocess textmodels:nothing for version 0: AttributeError"):
        ServedModel(opts, torch.device("cpu"))
    built = ServedModel(parse_model_arg(SPEC), torch.device("cpu"))
    assert textmodels.BUILT == ["pre", "post"] and callable(built.preprocess)  # arg.dim not passed to the stages


def test_text_in_answers_equal_in_process_batched_and_alone(cluster, textmodels):
    cluster.start_master()
    cluster.start_workers(1, "--max-queue-delay-us", "30000", "--stage-threads", "2", "--metrics-port", "0",
                          model=SPEC)
    rng = np.random.default_rng(1)
    texts = [["".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(1, 30))))
              for _ in range(1 + k % 2)] for k in range(24)]
    with Client(cluster.frontend, timeout=30) as c:
        alone = c.infer_async("txt", {"text": np.array([b"hello"], dtype=object)}).result(timeout=30)
        futures = [c.infer_async("txt", {"text": t}) for t in texts]
        replies = [f.result(timeout=30) for f in futures]
    want = in_process(textmodels, ["hello"])
    np.testing.assert_allclose(alone.outputs["vector"], want["vector"], rtol=1e-5, atol=1e-5)
    assert alone.outputs["label"].tolist() == [b"short"]
    assert set(alone.header["timing"]) == {"preprocess_ms", "queue_ms", "compute_ms", "postprocess_ms"}
    for t, r in zip(texts, replies, strict=True):
        want = in_process(textmodels, t)
        np.testing.assert_allclose(r.outputs["vector"], want["vector"], rtol=1e-5, atol=1e-5)
        assert r.outputs["label"].tolist() == want["label"].tolist()
    assert max(r.header["batch_rows"] for r in replies) > 2  # tokenized lengths differ: ragged batches

    from test_metrics import scrape, value

    samples = scrape(cluster.workers[0].info["metrics"])
    for stage in ("preprocess", "postprocess"):
        assert value(samples, "ringserve_worker_stage_duration_seconds_count", model="txt", stage=stage) == 25


def test_a_failing_stage_fails_only_its_own_request(cluster, textmodels):
    cluster.start_master()
    cluster.start_workers(1, "--stage-threads", "2", model=SPEC)
    bad = {"raise-bad": (BadRequest, "this text is not allowed"),
           "raise": (Internal, "preprocess raised RuntimeError: the tokenizer broke"),
           "wrong": (Internal, "preprocess returned list"),
           "post-raise": (Internal, "postprocess raised ValueError: pooling broke"),
           "post-wrong": (Internal, "postprocess returned int"),
           "x" * 40: (BadRequest, "beyond this model's maximum 32"),
           b"\xff\xfe": (BadRequest, "not valid UTF-8"),
           3: (BadRequest, "dtype")}
    with Client(cluster.frontend, timeout=20) as c:
        hung = [c.infer_async("txt", {"text": [b"hang"]}, timeout=1.0),
                c.infer_async("txt", {"text": [b"post-hang"]}, timeout=1.0)]
        futures = {}
        for k, (text, _) in enumerate(bad.items()):
            inputs = {"text": np.array([text if isinstance(text, bytes) else str(text).encode()], dtype=object)}
            if text == 3:
                inputs = {"text": np.array([3], np.int64)}
            futures[text] = c.infer_async("txt", inputs)
            futures[f"good{k}"] = c.infer_async("txt", {"text": [f"fine {k}"]})
        for key, fut in futures.items():
            if key in bad:
                kind, message = bad[key]
                with pytest.raises(kind, match=message):
                    fut.result(timeout=20)
            else:
                assert fut.result(timeout=20).outputs["vector"].shape == (1, 4)
        t0 = time.monotonic()
        for fut in hung:
            with pytest.raises(Timeout):  # the worker's watchdog or the master: both at the deadline
                fut.result(timeout=20)
        assert time.monotonic() - t0 < 10  # answered at the deadline, not after the 30 s the stage sleeps
        # Both stage threads hung once; replacements serve the next requests.
        for k in range(4):
            assert c.infer("txt", {"text": [f"after {k}"]}, timeout=10)["vector"].shape == (1, 4)
    cluster.check_books()
