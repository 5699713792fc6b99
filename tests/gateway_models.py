"""Models the gateway tests serve (imported by workers as tests.gateway_models, run from the repository root)."""
from __future__ import annotations

import torch
from torch import nn


class EchoAll(nn.Module):
    """Returns every input as `<name>_out`, any dtype and shape: for the gateway's datatype round trips."""

    def __init__(self):
        super().__init__()
        self.one = nn.Parameter(torch.ones(()))

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"{k}_out": v for k, v in inputs.items()}


def echo_all() -> nn.Module:
    return EchoAll()
