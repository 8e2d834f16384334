"""layer_skip: remove a whole block (ShortGPT, SLEB). Later blocks' KV-cache indices shift down."""
from __future__ import annotations

from tailor.passes.base import Option, exact_keys
from tailor.passes.cost import LayerShape
from tailor.rewriter import onnx_surgery
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.torch_surgery import block_path, remove_layers

NAME = "layer_skip"


def candidates(graph: TransformerGraph, signals) -> list[Option]:
    return [_skip(b.index) for b in graph.blocks]


def _skip(layer: int) -> Option:
    return Option(NAME, layer, {}, (f"attn:{layer}", f"ffn:{layer}", f"layer:{layer}"),
                  label=f"skip layer {layer}")


def from_plan(graph: TransformerGraph, layer: int, choice: dict) -> Option:
    exact_keys(choice, set())
    return _skip(layer)


def reshape(option: Option, shape: LayerShape) -> None:
    shape.kept = False


def apply_torch(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    remove_layers(model, [block_path(model, graph.blocks[o.layer]) for o in options])


def apply_onnx(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    values = onnx_surgery.block_values(model, graph)
    # found before any bypass, and applied last first: a skipped block's input may be the output
    # of the skipped block before it
    ends = [(values[o.layer].output, values[o.layer].input) for o in sorted(options, key=lambda o: -o.layer)]
    for output, block_input in ends:
        onnx_surgery.bypass(model, output, block_input)
