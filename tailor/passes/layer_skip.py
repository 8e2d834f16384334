"""layer_skip: remove a whole block (ShortGPT, SLEB). Later blocks' KV-cache indices shift down."""
from __future__ import annotations

from tailor.backends.base import Backend
from tailor.passes.base import Option, Pass, exact_keys
from tailor.passes.cost import LayerShape
from tailor.rewriter.graph import TransformerGraph


def _skip(layer: int) -> Option:
    return Option(LayerSkip.name, layer, {}, (f"attn:{layer}", f"ffn:{layer}", f"layer:{layer}"),
                  label=f"skip layer {layer}")


class LayerSkip(Pass):
    name = "layer_skip"

    def candidates(self, graph: TransformerGraph, signals) -> list[Option]:
        return [_skip(b.index) for b in graph.blocks]

    def proxy(self, graph: TransformerGraph, option: Option, signals) -> float:
        return signals.block_influence[option.layer]  # ShortGPT's block influence: 1 - cos(in, out)

    def from_plan(self, graph: TransformerGraph, layer: int, choice: dict) -> Option:
        exact_keys(choice, set())
        return _skip(layer)

    def reshape(self, option: Option, shape: LayerShape) -> None:
        shape.kept = False

    def apply(self, backend: Backend, options: list[Option], signals) -> None:
        backend.remove_blocks([o.layer for o in options])
