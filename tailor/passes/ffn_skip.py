"""ffn_skip: drop the FFN branch of a pre-norm block (FFN-SkipLLM), replaced by the mean of its
output on calibration data, so the residual stream keeps its average offset."""
from __future__ import annotations

import numpy as np

from tailor.passes.base import Option, exact_keys
from tailor.passes.cost import LayerShape
from tailor.rewriter import onnx_surgery
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.torch_surgery import ffn_path, replace_with_constant

NAME = "ffn_skip"


def candidates(graph: TransformerGraph, signals) -> list[Option]:
    # post-norm blocks normalise after the FFN's residual add: the branch is not separable there
    return [_skip(b.index) for b in graph.blocks if b.residual == "pre_norm"]


def _skip(layer: int) -> Option:
    return Option(NAME, layer, {}, (f"ffn:{layer}",), label=f"skip FFN {layer}")


def from_plan(graph: TransformerGraph, layer: int, choice: dict) -> Option:
    exact_keys(choice, set())
    if graph.blocks[layer].residual != "pre_norm":
        raise ValueError("the block is post-norm: its FFN branch cannot be skipped")
    return _skip(layer)


def reshape(option: Option, shape: LayerShape) -> None:
    shape.ffn = False


def apply_torch(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    for o in options:
        replace_with_constant(model, ffn_path(model, graph.blocks[o.layer]), graph.hidden_size,
                              returns_tuple=False,
                              mean=signals.ffn_mean[o.layer] if signals is not None else None)


def apply_onnx(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    values = onnx_surgery.block_values(model, graph)
    for o in options:
        mean = signals.ffn_mean[o.layer] if signals is not None else np.zeros(graph.hidden_size)
        onnx_surgery.replace_with_constant(model, values[o.layer].ffn_out, mean)
