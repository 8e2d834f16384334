"""Running a model (transformers or onnx_ir) on calibration inputs, and the divergence the search
minimises: next-token KL for LMs, 1 - cosine of hidden states for encoders."""
from __future__ import annotations

import copy

import onnx_ir as ir
import torch

from tailor.backends.runners import as_runnable
from tailor.data.calibration import Inputs, batches
from tailor.rewriter import onnx_surgery


def model_outputs(model, ids: Inputs, batch: int = 4) -> list[torch.Tensor]:
    """Logits (LMs) or hidden states of a transformers or onnx_ir model, in batches."""
    run = as_runnable(model)
    with torch.no_grad():
        return [run(b).float() for b in batches(ids, batch)]


def clone(model):
    """An independent copy to rewrite: a transformers model or an onnx_ir model."""
    return onnx_surgery.clone(model) if isinstance(model, ir.Model) else copy.deepcopy(model)


def divergence(reference: list[torch.Tensor], outputs: list[torch.Tensor], is_lm: bool) -> float:
    """Mean per-token KL(reference || output) for LMs; 1 - cosine of hidden states otherwise."""
    total, count = 0.0, 0
    for ref, out in zip(reference, outputs):
        if is_lm:
            lp_ref, lp = torch.log_softmax(ref.double(), -1), torch.log_softmax(out.double(), -1)
            kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
        else:
            kl = 1 - torch.cosine_similarity(ref.double(), out.double(), dim=-1)
        total += float(kl.sum())
        count += kl.numel()
    return total / max(count, 1)
