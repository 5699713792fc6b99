"""Sequence packing for encoder models: a batch's real tokens laid end to end, so no padding is computed.

A ragged batch reaches the model padded to its longest request (worker/batching.py). An encoder
(BERT and its kin) costs per token it computes, padding included, so a batch of sentences of
mixed lengths pays for tokens nobody sent; sorting by length (what ``SentenceTransformer.encode``
does over a whole list) is not open to a server that batches whatever is queued. Packing puts
the batch's sentences one after another in as few rows as ``capacity`` tokens allows, gives each
token its position within its own sentence, and lets a token attend only to the tokens of its
own sentence (a block-diagonal mask). Each sentence then gets the answer it gets alone (to float
rounding: the products run on other shapes), while the encoder's matrix products run on the
real tokens only. Serving stacks for text embeddings do the same (Hugging Face's
text-embeddings-inference runs sequences unpadded).

A model opts in from its own ``forward`` (docs/models.md shows it) and declares ``packed`` in
its ragged ``input_spec``, so the worker's batching stops cutting batches by length: padding
costs such a model nothing. Plain functions of tensors, no state: tests/test_packing.py checks
them against the padded batch.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import torch


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Which sentences share each row: as few rows as `capacity` tokens per row allows
    (``ceil(total / capacity)``), filled longest first into the emptiest row, so the rows come out
    nearly even (the widest is at most its share plus one sentence). Every index appears once;
    a row's sentences keep no particular order."""
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    total = sum(lengths)
    nrows = max(1, min(len(lengths), math.ceil(total / capacity)))
    rows: list[list[int]] = [[] for _ in range(nrows)]
    fill = [(0, r) for r in range(nrows)]  # (tokens so far, row): a heap, the emptiest first
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        used, r = heapq.heappop(fill)
        rows[r].append(i)
        heapq.heappush(fill, (used + lengths[i], r))
    return [row for row in rows if row]


@dataclass(frozen=True)
class Packed:
    """A padded batch repacked: what to give the encoder, and where each sentence went."""

    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]: each token's position within its own sentence
    attention_mask: torch.Tensor  # [rows, 1, width, width], additive: 0 within a sentence, the dtype's min elsewhere
    token_mask: torch.Tensor  # [batch, length] bool: the real tokens of the padded batch
    places: tuple[tuple[int, int, int], ...]  # per sentence of the batch: (row, first column, tokens)

    def unpack(self, hidden: torch.Tensor) -> torch.Tensor:
        """The encoder's packed output [rows, width, ...] back in the padded batch's layout
        [batch, length, ...], zeros on the padding."""
        batch, length = self.token_mask.shape
        out = hidden.new_zeros((batch, length, *hidden.shape[2:]))
        for i, (r, at, n) in enumerate(self.places):
            out[i][self.token_mask[i]] = hidden[r, at:at + n]
        return out


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, pad_id: int = 0, capacity: int = 128,
         dtype: torch.dtype = torch.float32, position_offset: int = 0) -> Packed:
    """Pack a padded batch (`attention_mask` 1 on real tokens, anywhere in the row) into rows of
    about `capacity` tokens. `dtype` is the mask's (the model's float dtype); `position_offset`
    is the first position id (0 for BERT; models that count positions from after the padding
    index, as RoBERTa does, pass ``pad_token_id + 1``)."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"pack takes [batch, length] ids and mask, got {list(input_ids.shape)} "
                         f"and {list(attention_mask.shape)}")
    real = attention_mask.bool()
    lengths = real.sum(1).tolist()
    rows = plan_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    device = input_ids.device
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype, device=device)
    pos = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    # Which sentence each column holds; a padding column is a segment of its own, so that no row
    # of the mask is all masked (in half precision that row's softmax would be NaN, and feed NaN on).
    seg = -torch.arange(1, width + 1, device=device).repeat(len(rows), 1)
    places: list[tuple[int, int, int]] = [(0, 0, 0)] * len(lengths)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            ids[r, at:at + n] = input_ids[i][real[i]]
            pos[r, at:at + n] = torch.arange(position_offset, position_offset + n, device=device)
            seg[r, at:at + n] = i
            places[i] = (r, at, n)
            at += n
    same = seg[:, :, None] == seg[:, None, :]
    mask = torch.zeros((len(rows), 1, width, width), dtype=dtype, device=device)
    mask.masked_fill_(~same[:, None], torch.finfo(dtype).min)
    return Packed(ids, pos, mask, real, tuple(places))
