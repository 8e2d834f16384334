"""ConstantBranch: a residual branch replaced by a constant (installed by ffn_skip and head_prune)."""
from __future__ import annotations

import torch
from torch import nn


class ConstantBranch(nn.Module):
    """A residual branch replaced by its mean output on calibration data, whatever the input
    (a skipped FFN or attention). Returns (value, None) where the replaced module returned a
    tuple (HF attention modules do)."""

    def __init__(self, hidden: int, returns_tuple: bool, dtype=torch.float32):
        super().__init__()
        self.returns_tuple = returns_tuple
        self.register_buffer("mean_output", torch.zeros(hidden, dtype=dtype))

    def forward(self, hidden_states, *args, **kwargs):
        out = self.mean_output.to(hidden_states.dtype).expand_as(hidden_states)
        return (out, None) if self.returns_tuple else out
