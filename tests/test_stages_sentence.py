"""docs/models.md's sentence-transformers example is true: its my_text.py, copied verbatim, serves a
tiny tokenizer + BERT built from configs (no download) and saved as a sentence-transformers
directory (modules.json, 1_Pooling, 2_Normalize); text in, and every answer equals
SentenceTransformer.encode (batch 16) to 1e-5, alone and in ragged batches. Without
sentence-transformers installed, the reference is the same steps run in-process with transformers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from ringserve.client import BadRequest, Client  # noqa: E402

pytestmark = pytest.mark.timeout(240)
DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away", "is", "big", "small", "##s", "##ed",
         "##ing", "red", "blue", "house", "tree", "under", "over", "and", "with"]
SENTENCES = ["the cat sat on the mat", "a dog", "dogs ran far away", "the big red house",
             "a small blue tree under the house", "cats", "the dog sat with the cat and ran",
             "blue", "trees and houses", "a cat is on a mat", "over the tree", "the mat is red",
             "running dogs", "a big dog and a small cat sat under a blue tree with a red house", "ran", "away"]


def my_text_from_docs(where: Path) -> None:
    code = re.search(r"<!-- stages: my_text\.py.*?-->\s*```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    where.mkdir(parents=True, exist_ok=True)
    (where / "my_text.py").write_text(code)


def build_st_dir(d: Path) -> Path:
    """A sentence-transformers directory as all-MiniLM-L6-v2 lays it out, from configs."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    tok.save_pretrained(d)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(d)
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    (d / "2_Normalize").mkdir()
    return d


def reference(d: Path, sentences: list[str]) -> np.ndarray:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # the same steps in-process: tokenizer (truncating at 12), BERT, mean pooling, normalize
        tok = transformers.AutoTokenizer.from_pretrained(d)
        model = transformers.AutoModel.from_pretrained(d).eval()
        x = tok(sentences, padding=True, truncation=True, max_length=12, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state
        mask = x["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
    return SentenceTransformer(str(d), device="cpu").encode(sentences, batch_size=16, convert_to_numpy=True)


@pytest.fixture
def st_dir(tmp_path, monkeypatch):
    d = build_st_dir(tmp_path / "minilm-tiny")
    my_text_from_docs(tmp_path / "pkg")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "pkg"))
    return d


def test_the_documented_sentence_model_answers_text_as_encode_does(cluster, st_dir):
    want = reference(st_dir, SENTENCES)
    assert np.allclose(np.linalg.norm(want, axis=1), 1.0, atol=1e-5)
    cluster.start_master()
    cluster.start_workers(1, "--max-queue-delay-us", "30000",
                          model=f"minilm=my_text:encoder,preprocess=my_text:tokenizer,postprocess=my_text:pooling,"
                                f"arg.path={st_dir}")
    with Client(cluster.frontend, timeout=60) as c:
        alone = c.infer("minilm", {"text": [SENTENCES[0]]})["embedding"]
        np.testing.assert_allclose(alone, want[:1], rtol=1e-5, atol=1e-5)
        futures = [c.infer_async("minilm", {"text": [s]}) for s in SENTENCES]
        replies = [f.result(timeout=60) for f in futures]
        two = c.infer("minilm", {"text": np.array(SENTENCES[1:3], dtype=object)})["embedding"]  # padded in one request
        with pytest.raises(BadRequest, match="not valid UTF-8"):
            c.infer("minilm", {"text": [b"\xff"]})
        with pytest.raises(BadRequest, match=r"shape \[2, 1\], expected \[.N.\]"):  # the stage's input_spec
            c.infer("minilm", {"text": [["a"], ["b"]]})
    for k, r in enumerate(replies):
        np.testing.assert_allclose(r.outputs["embedding"], want[k:k + 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(two, want[1:3], rtol=1e-5, atol=1e-5)
    assert max(r.header["batch_rows"] for r in replies) > 1  # sentences of different lengths shared batches
    assert all(r.header["timing"]["preprocess_ms"] >= 0 for r in replies)
