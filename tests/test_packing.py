"""worker/packing.py: each sentence of a packed batch gets the answer it gets alone, and rows are planned as said.

The encoder is a tiny BERT built from a config (no download), run on batches of mixed lengths,
right- and left-padded, in float32 and float16; the plan is checked on random lengths."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ringserve.worker.batching import ragged_from_spec
from ringserve.worker.packing import pack, plan_rows

pytestmark = pytest.mark.timeout(120)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=64), st.integers(1, 600))
def test_rows_hold_every_sentence_once_in_as_few_rows_as_the_capacity_allows(lengths, capacity):
    rows = plan_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert len(rows) <= max(1, min(len(lengths), math.ceil(sum(lengths) / capacity)))
    widest = max(sum(lengths[i] for i in row) for row in rows)
    assert widest <= math.ceil(sum(lengths) / len(rows)) + max(lengths)  # nearly even: at most one sentence over


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def padded_batch(lengths: list[int], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(lengths))
    width = max(lengths)
    ids, mask = torch.zeros((len(lengths), width), dtype=torch.long), torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[i, cols] = torch.randint(5, 50, (n,), generator=g)
        mask[i, cols] = 1
    return ids, mask


@pytest.mark.parametrize("lengths,capacity", [([7], 128), ([3, 17, 9, 30, 1, 12], 128), ([3, 17, 9, 30, 1, 12], 32),
                                              ([40] * 5 + [2] * 7, 48)])
@pytest.mark.parametrize("left", [False, True])
def test_each_sentence_of_a_packed_batch_gets_its_answer_alone(bert, lengths, capacity, left):
    ids, mask = padded_batch(lengths, left)
    real = mask.bool()
    with torch.inference_mode():  # each sentence run alone, unpadded: what its answer must be
        want = torch.zeros((*ids.shape, bert.config.hidden_size))
        for i in range(len(lengths)):
            want[i][real[i]] = bert(input_ids=ids[i][real[i]][None]).last_hidden_state[0]
        p = pack(ids, mask, capacity=capacity)
        got = p.unpack(bert(input_ids=p.input_ids, attention_mask=p.attention_mask,
                            position_ids=p.position_ids).last_hidden_state)
    assert got.shape == want.shape
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert not got[~real].any()  # padding comes back as zeros
    if capacity >= sum(lengths):
        assert p.input_ids.shape == (1, sum(lengths))  # one row, no padding computed at all


def test_half_precision_packing_gives_no_nan(bert):
    ids, mask = padded_batch([5, 20, 11, 3])
    half = type(bert)(bert.config).eval()
    half.load_state_dict(bert.state_dict())
    half = half.to(torch.float16)
    with torch.inference_mode():
        p = pack(ids, mask, capacity=16, dtype=torch.float16)  # several rows, with padding at their ends
        got = p.unpack(half(input_ids=p.input_ids, attention_mask=p.attention_mask,
                            position_ids=p.position_ids).last_hidden_state)
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(got).all()
    real = mask.bool()
    torch.testing.assert_close(got[real].float(), want[real], rtol=0.05, atol=0.05)


def test_pack_refuses_what_is_not_a_padded_batch():
    with pytest.raises(ValueError, match="batch, length"):
        pack(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="capacity"):
        plan_rows([3], 0)


def test_packed_is_a_model_wide_ragged_option_that_must_be_a_bool():
    spec = {"input_ids": ((None, None), "int64", {"pad": 0, "mask": "attention_mask", "packed": True}),
            "attention_mask": ((None, None), "int64")}
    assert ragged_from_spec(spec).packed
    spec["input_ids"][2]["packed"] = "yes"
    with pytest.raises(ValueError, match="packed must be true or false"):
        ragged_from_spec(spec)
