"""ffn_skip: drop the FFN branch of a pre-norm block (FFN-SkipLLM), replaced by the mean of its
output on calibration data, so the residual stream keeps its average offset."""
from __future__ import annotations

from tailor.backends.base import Backend
from tailor.passes.base import Option, Pass, exact_keys
from tailor.passes.cost import LayerShape
from tailor.rewriter.graph import TransformerGraph


def _skip(layer: int) -> Option:
    return Option(FfnSkip.name, layer, {}, (f"ffn:{layer}",), label=f"skip FFN {layer}")


class FfnSkip(Pass):
    name = "ffn_skip"

    def candidates(self, graph: TransformerGraph, signals) -> list[Option]:
        # post-norm blocks normalise after the FFN's residual add: the branch is not separable there
        return [_skip(b.index) for b in graph.blocks if b.residual == "pre_norm"]

    def proxy(self, graph: TransformerGraph, option: Option, signals) -> float:
        return signals.ffn_contribution[option.layer] ** 2  # the branch's size beside the residual

    def from_plan(self, graph: TransformerGraph, layer: int, choice: dict) -> Option:
        exact_keys(choice, set())
        if graph.blocks[layer].residual != "pre_norm":
            raise ValueError("the block is post-norm: its FFN branch cannot be skipped")
        return _skip(layer)

    def reshape(self, option: Option, shape: LayerShape) -> None:
        shape.ffn = False

    def apply(self, backend: Backend, options: list[Option], signals) -> None:
        for o in options:
            mean = signals.ffn_mean[o.layer] if signals is not None else None
            backend.constant_branch(o.layer, "ffn", mean)
