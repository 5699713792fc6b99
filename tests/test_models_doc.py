"""docs/models.md is true: its Hugging Face factory, copied verbatim, serves a small encoder
built from a config (no download) through a real master and worker; ignore_keys; clean errors;
its sentence-transformers factory serves a hand-made sentence-transformers directory (pooling,
Normalize) and a checkpoint whose keys carry a prefix (strip_prefix/add_prefix)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringserve.client import Client  # noqa: E402
from ringserve.client.admin import AdminClient  # noqa: E402
from ringserve.launch.procs import wait_for_workers, wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(180)
DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"


def factory_from_docs(where: Path) -> Path:
    text = DOC.read_text()
    where.mkdir(parents=True, exist_ok=True)
    for name in ("my_models", "my_st"):
        code = re.search(rf"<!-- factory: {name}\.py.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
        (where / f"{name}.py").write_text(code)
    return where


@pytest.fixture
def encoder_dir(tmp_path, monkeypatch):
    """A tiny BERT saved to a local directory, and the docs' factory on PYTHONPATH."""
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    pkg = factory_from_docs(tmp_path / "pkg")
    monkeypatch.setenv("PYTHONPATH", str(pkg))
    monkeypatch.syspath_prepend(str(pkg))
    return tmp_path / "bert"


def batch(rows: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    mask = np.ones((rows, seq), np.int64)
    mask[0, seq - 2:] = 0  # one padded row
    return {"input_ids": rng.integers(1, 99, (rows, seq)).astype(np.int64), "attention_mask": mask}


def test_the_documented_hf_factory_serves_and_matches_in_process(cluster, encoder_dir):
    import my_models  # noqa: PLC0415 - written from the docs by the fixture

    cluster.start_master()
    cluster.start_workers(1, "--max-batch-size", "8", model=f"enc=my_models:encoder,arg.path={encoder_dir}")
    ref = my_models.encoder(str(encoder_dir)).eval()
    x = batch(3, 7)
    with torch.inference_mode():
        want = ref(**{k: torch.from_numpy(v) for k, v in x.items()})["embedding"].numpy()
    with Client(cluster.frontend, timeout=30) as c:
        reply = c.infer_async("enc", x).result(timeout=30)
        assert reply.version == 0 and reply.outputs["embedding"].shape == (3, 32)
        np.testing.assert_allclose(reply.outputs["embedding"], want, rtol=1e-4, atol=1e-5)
        from ringserve.client import BadRequest
        with pytest.raises(BadRequest, match="input_ids"):
            c.infer("enc", {"input_ids": x["input_ids"].astype(np.float32), "attention_mask": x["attention_mask"]})


def test_the_documented_factory_batches_sentences_of_mixed_lengths_as_if_alone(cluster, encoder_dir):
    """Ragged batching on a real BERT: unpadded requests of many lengths, most without a mask, share
    batches (padded by the worker to a bucket) and each answer equals the model run on it alone."""
    import my_models  # noqa: PLC0415

    cluster.start_master()
    cluster.start_workers(1, "--max-queue-delay-us", "50000", model=f"enc=my_models:encoder,arg.path={encoder_dir}")
    ref = my_models.encoder(str(encoder_dir)).eval()
    rng = np.random.default_rng(5)
    sent = [rng.integers(1, 99, (1 + k % 2, int(rng.integers(1, 65)))).astype(np.int64) for k in range(32)]
    with Client(cluster.frontend, timeout=60) as c:
        futures = [c.infer_async("enc", {"input_ids": ids} if k % 3 else
                                 {"input_ids": ids, "attention_mask": np.ones_like(ids)}) for k, ids in enumerate(sent)]
        replies = [f.result(timeout=60) for f in futures]
        from ringserve.client import BadRequest
        with pytest.raises(BadRequest, match="beyond this model's maximum 64"):
            c.infer("enc", {"input_ids": np.ones((1, 65), np.int64)})
    for ids, reply in zip(sent, replies):
        with torch.inference_mode():
            want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)))
        np.testing.assert_allclose(reply.outputs["embedding"], want["embedding"].numpy(), rtol=1e-5, atol=1e-5)
    assert max(r.header["batch_rows"] for r in replies) > 2  # different lengths did share batches


def test_checkpoint_keys_the_module_lacks_fail_in_one_line_or_are_ignored_when_asked(cluster, encoder_dir, tmp_path):
    import my_models  # noqa: PLC0415
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in my_models.encoder(str(encoder_dir)).state_dict().items()}
    state["encoder.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)  # as older BERT checkpoints carry
    save_file(state, str(tmp_path / "enc.safetensors"))
    spec = f"enc=my_models:encoder,arg.path={encoder_dir},weights={tmp_path / 'enc.safetensors'}"

    out = subprocess.run([sys.executable, "-m", "ringserve.launch.worker", "--master", "tcp://127.0.0.1:9",
                          "--model", spec], capture_output=True, text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert last.startswith("error: model 'enc': cannot load") and "encoder.embeddings.position_ids" in last
    assert "ignore_keys" in last

    cluster.start_master()
    cluster.start_workers(1, model=spec + ",ignore_keys=*position_ids")
    st = wait_for_workers(cluster.admin, 1, 60)
    assert st["workers"][0]["models"]["enc"]["ignored_keys"] == ["encoder.embeddings.position_ids"]
    with Client(cluster.frontend, timeout=30) as c:
        assert c.infer("enc", batch(2, 5))["embedding"].shape == (2, 32)
    assert AdminClient(cluster.admin).status()["models"]["enc"]["ok"] == 1


# ------------------------------------------------------------------ sentence-transformers
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=64)


def st_directory(where: Path, pooling: str = "mean_tokens", normalize: bool = True, seed: int = 0) -> Path:
    """The layout SentenceTransformer.save() writes: the Transformer at the root, 1_Pooling, 2_Normalize."""
    torch.manual_seed(seed)
    transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(where)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (where / "1_Pooling").mkdir()
    (where / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, **{f"pooling_mode_{m}": m == pooling
                                             for m in ("cls_token", "mean_tokens", "max_tokens")}}))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (where / "2_Normalize").mkdir()
    (where / "modules.json").write_text(json.dumps(modules))
    return where


def st_reference(bert, x: dict[str, np.ndarray], pooling: str, normalize: bool) -> np.ndarray:
    """What sentence-transformers computes, written out here independently of the docs' factory."""
    ids, mask = torch.from_numpy(x["input_ids"]), torch.from_numpy(x["attention_mask"])
    with torch.inference_mode():
        hidden = bert.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    if pooling == "cls_token":
        out = hidden[:, 0]
    elif pooling == "max_tokens":
        out = torch.where(m > 0, hidden, torch.tensor(-1e30)).max(dim=1).values
    else:
        out = (hidden * m).sum(1) / m.sum(1)
    return (out / out.norm(dim=1, keepdim=True) if normalize else out).numpy()


@pytest.mark.parametrize("pooling,normalize", [("cls_token", False), ("max_tokens", True)])
def test_the_documented_st_factory_pools_as_its_directory_says(encoder_dir, tmp_path, pooling, normalize):
    import my_st  # noqa: PLC0415 - written from the docs by the fixture

    st = st_directory(tmp_path / "st", pooling, normalize)
    x = batch(3, 7)
    with torch.inference_mode():
        got = my_st.sentence_encoder(str(st)).eval()(**{k: torch.from_numpy(v) for k, v in x.items()})["embedding"]
    want = st_reference(transformers.BertModel.from_pretrained(st), x, pooling, normalize)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_a_sentence_transformers_directory_and_a_prefixed_checkpoint_are_served(cluster, encoder_dir, tmp_path):
    from safetensors.torch import save_file

    st = st_directory(tmp_path / "st")
    cluster.start_master()
    from_dir = cluster.start_workers(1, model=f"st=my_st:sentence_encoder,arg.path={st}", names=["dir"])[0]
    x = batch(3, 9)
    with Client(cluster.frontend, timeout=60) as c:
        got = c.infer("st", x)["embedding"]
    want = st_reference(transformers.BertModel.from_pretrained(st), x, "mean_tokens", True)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)  # Normalize

    # A fine-tuned export as SentenceTransformer.state_dict() writes it: "0.auto_model." on every key
    torch.manual_seed(1)
    tuned = transformers.BertModel(transformers.BertConfig(**TINY))
    save_file({f"0.auto_model.{k}": v.contiguous() for k, v in tuned.state_dict().items()},
              str(tmp_path / "tuned.safetensors"))
    spec = f"st=my_st:sentence_encoder,arg.path={st},weights={tmp_path / 'tuned.safetensors'}"
    out = subprocess.run([sys.executable, "-m", "ringserve.launch.worker", "--master", "tcp://127.0.0.1:9",
                          "--model", spec], capture_output=True, text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "0.auto_model.embeddings" in last and "strip_prefix" in last, last

    cluster.start_workers(1, model=spec + ",strip_prefix=0.auto_model.,add_prefix=encoder.", names=["tuned"])
    from_dir.stop()  # only the fine-tuned worker serves now
    wait_until(lambda: [w["name"] for w in AdminClient(cluster.admin).status()["workers"]] == ["tuned"], 30,
               0.2, "the directory's worker to leave")
    with Client(cluster.frontend, timeout=60) as c:
        got = c.infer("st", x)["embedding"]
    np.testing.assert_allclose(got, st_reference(tuned, x, "mean_tokens", True), rtol=1e-4, atol=1e-5)


def test_rename_keys_touches_only_keys_the_module_lacks_and_never_merges_two():
    from ringserve.worker.loader import WeightsRefused, rename_keys

    layout = {"encoder.a": None, "encoder.b": None}
    assert rename_keys({"0.auto_model.a": 1, "encoder.b": 2}, layout, "0.auto_model.", "encoder.") == \
        {"encoder.a": 1, "encoder.b": 2}
    assert rename_keys({"bert.a": 1, "b": 2}, layout, "bert.", "encoder.") == {"encoder.a": 1, "encoder.b": 2}
    assert rename_keys({"x.a": 1}, layout) == {"x.a": 1}
    with pytest.raises(WeightsRefused, match="two checkpoint keys"):
        rename_keys({"bert.a": 1, "a": 2}, layout, "bert.", "encoder.")
