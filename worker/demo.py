"""Demo models shipped with ringserve, so the local cluster and the tests need no download.

Every factory is deterministic for a given seed. A model may declare ``input_spec``:
name -> (shape with None for free dims, dtype[, options]); the worker checks requests against it,
and options declare a variable-length input (``seq_encoder``; docs/models.md). ``batch_mean``
shows a model that must not be batched (``max_batch_size = 1``).
"""
from __future__ import annotations

import time

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_dim: int = 256, hidden: int = 1024, out_dim: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_dim))
        self.input_spec = {"x": ((None, in_dim), "float32")}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 1, size: int = 28, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(16 * 16, classes)
        self.input_spec = {"image": ((None, channels, size, size), "float32")}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.features(image).flatten(1))}


class Echo(nn.Module):
    """Returns its input times a scale; any trailing shape. The no-op model of the benchmarks."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.delay = delay
        self.input_spec = {"x": (None, "float32")}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.delay:
            time.sleep(self.delay)
        if torch.isnan(x).any():
            raise ValueError("input contains NaN")
        return {"y": x * self.scale}


def _seeded(seed: int):
    torch.manual_seed(seed)


def mlp(in_dim: int = 256, hidden: int = 1024, out_dim: int = 10, seed: int = 0) -> nn.Module:
    _seeded(seed)
    return MLP(in_dim, hidden, out_dim)


def cnn(channels: int = 1, size: int = 28, classes: int = 10, seed: int = 0) -> nn.Module:
    _seeded(seed)
    return SmallCNN(channels, size, classes)


def noop() -> nn.Module:
    return Echo()


def slow(delay: float = 1.0) -> nn.Module:
    """Echo that sleeps `delay` seconds per batch: for timeouts, overload and failover tests."""
    return Echo(delay)


class Stack(nn.Module):
    """`layers` square Linear layers: a model whose weights split into many equal tensors."""

    def __init__(self, layers: int, width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.input_spec = {"x": ((None, width), "float32")}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return {"y": x}


def stack(layers: int = 100, width: int = 512, seed: int = 0) -> nn.Module:
    """100 x 512x512 fp32 is ~105 MB: the weight-sync benchmark's model (one layer = 1%)."""
    _seeded(seed)
    return Stack(layers, width)


class Embed(nn.Module):
    """A tiny sentence encoder: token + position embeddings, mean-pooled over the attention mask.

    Its failures are the ones real encoders have on bad input: an id >= vocab or a sequence
    longer than max_len raises IndexError, ids and mask of different lengths a shape RuntimeError.
    """

    def __init__(self, vocab: int, dim: int, max_len: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.input_spec = {"ids": ((None, None), "int64"), "mask": ((None, None), "int64")}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.tokens(ids) + self.positions(pos)
        m = mask.unsqueeze(-1).to(h.dtype)
        return {"embedding": (h * m).sum(1) / m.sum(1).clamp(min=1.0)}


def embed(vocab: int = 100, dim: int = 16, max_len: int = 32, seed: int = 0) -> nn.Module:
    _seeded(seed)
    return Embed(vocab, dim, max_len)


class ComplexOut(nn.Module):
    """Returns a complex tensor, which the wire format refuses: the worker must answer INTERNAL."""

    def __init__(self):
        super().__init__()
        self.input_spec = {"x": (None, "float32")}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": torch.complex(x, x)}


def complex_out() -> nn.Module:
    return ComplexOut()


class SeqEncoder(nn.Module):
    """A small transformer encoder over token ids and an attention mask (1: a token, 0: padding,
    as in Hugging Face): per-token states and their masked mean, one vector per row.

    With ``ragged`` it declares its inputs variable-length (docs/models.md): requests of different
    lengths share batches, padded to the next of ``buckets``; without, only requests of equal
    length batch together."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, buckets: tuple[int, ...], ragged: bool):
        super().__init__()
        max_len = buckets[-1]
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        ids: tuple = ((None, None), "int64")
        if ragged:
            ids += ({"pad": 0, "mask": "attention_mask", "buckets": list(buckets),
                     "seq_outputs": ["last_hidden_state"]},)
        self.input_spec = {"input_ids": ids, "attention_mask": ((None, None), "int64")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.encoder(self.tokens(input_ids) + self.positions(pos), src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return {"last_hidden_state": h, "pooled": (h * m).sum(1) / m.sum(1).clamp(min=1.0)}


def seq_encoder(vocab: int = 1000, dim: int = 64, heads: int = 4, layers: int = 2,
                buckets: tuple[int, ...] = (16, 32, 64, 128), ragged: bool = True, seed: int = 0) -> nn.Module:
    """Variable-length requests (up to the last bucket) for the ragged-batching tests and bench/ragged.py."""
    _seeded(seed)
    return SeqEncoder(vocab, dim, heads, layers, tuple(buckets), ragged)


class BatchMean(nn.Module):
    """The mean over a request's rows, [1, d]: an output that is not one row per input row, so a
    batch of several requests cannot be split. ``max_batch_size = 1`` (``batchable=False``)
    declares it, and the worker never batches it; otherwise batches fail and are re-run singly."""

    def __init__(self, batchable: bool):
        super().__init__()
        self.input_spec = {"x": ((None, None), "float32")}
        if not batchable:
            self.max_batch_size = 1

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mean": x.mean(0, keepdim=True)}


def batch_mean(batchable: bool = False) -> nn.Module:
    return BatchMean(batchable)
