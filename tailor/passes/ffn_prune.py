"""ffn_prune: keep a fraction of an FFN's channels (FLAP, LLM-Pruner's channel groups).

Channels are ranked by FLAP's fluctuation metric on the down projection's input:
Var(h_c) · ||W_down[:, c]||². The removed channels' mean contribution W_down[:, removed] · E[h_removed]
moves into the down projection's bias, so the branch keeps its average output.
"""
from __future__ import annotations

import numpy as np
import torch

from tailor.passes.base import Option
from tailor.passes.cost import LayerShape
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.torch_surgery import add_bias, module_path, slice_linear

NAME = "ffn_prune"
KEEP = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


def channel_scores(signals, layer: int) -> np.ndarray:
    return np.asarray(signals.down_input_var[layer]) * np.asarray(signals.down_col_norm2[layer])


def candidates(graph: TransformerGraph, signals) -> list[Option]:
    out = []
    for b in graph.blocks:
        f = b.ffn
        if any(p.columns is not None for p in f.projections):
            continue  # a fused gate_up weight (Phi-3): not sliced yet
        order = np.argsort(-channel_scores(signals, b.index), kind="stable")
        for keep in KEEP:
            n = max(8, int(round(f.width * keep / 8)) * 8)  # multiples of 8 stay kernel-friendly
            if n >= f.width:
                continue
            kept = sorted(int(c) for c in order[:n])
            out.append(Option(NAME, b.index, {"channels": kept}, (f"ffn:{b.index}",),
                              label=f"layer {b.index}: FFN keep {n}/{f.width}"))
    return out


def reshape(option: Option, shape: LayerShape) -> None:
    shape.ffn_width = len(option.choice["channels"])


def apply_torch(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    for o in options:
        f = graph.blocks[o.layer].ffn
        kept = torch.tensor(o.choice["channels"], dtype=torch.long)
        removed = torch.tensor(sorted(set(range(f.width)) - set(kept.tolist())), dtype=torch.long)
        delta = torch.zeros(f.down.out_features)
        if signals is not None and len(removed):
            w = model.get_submodule(module_path(f.down.weight.name)).weight.data
            mean = torch.as_tensor(np.asarray(signals.down_input_mean[o.layer]), dtype=w.dtype)
            delta = w[:, removed] @ mean[removed]
        for p in (f.gate, f.up):
            if p is not None:
                slice_linear(model, p, rows=kept)
        slice_linear(model, f.down, cols=kept)
        add_bias(model, f.down, delta)  # on reload (no signals) the value comes from the weights
