"""layer_skip: remove a whole block (ShortGPT, SLEB). Later blocks' KV-cache indices shift down."""
from __future__ import annotations

from tailor.passes.base import Option
from tailor.passes.cost import LayerShape
from tailor.rewriter import onnx_surgery
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.torch_surgery import block_path, remove_layers

NAME = "layer_skip"


def candidates(graph: TransformerGraph, signals) -> list[Option]:
    return [Option(NAME, b.index, {}, (f"attn:{b.index}", f"ffn:{b.index}", f"layer:{b.index}"),
                   label=f"skip layer {b.index}") for b in graph.blocks]


def reshape(option: Option, shape: LayerShape) -> None:
    shape.kept = False


def apply_torch(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    remove_layers(model, [block_path(model, graph.blocks[o.layer]) for o in options])


def apply_onnx(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    values = onnx_surgery.block_values(model, graph)
    # last first: a skipped block's input may be the output of the skipped block before it
    for o in sorted(options, key=lambda o: -o.layer):
        onnx_surgery.bypass(model, values[o.layer].output, values[o.layer].input)
