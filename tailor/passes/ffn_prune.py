"""ffn_prune: keep a fraction of an FFN's channels (FLAP, LLM-Pruner's channel groups).

Channels are ranked by what removing them costs once the kept channels of the down projection
and its bias are refitted by least squares on calibration statistics (FLAP's bias compensation
generalised): a greedy optimal brain surgeon on the down projection (tailor.passes.obs), which
unlike FLAP's per-channel fluctuation Var(h_c) · ||W_down[:, c]||² sees that channels carrying
the same signal are not both needed. The refit then makes the branch reproduce its full output
as closely as the kept channels allow.
"""
from __future__ import annotations

import numpy as np

from tailor.backends.base import Backend
from tailor.passes.base import Option, Pass, exact_keys, sliceable, sorted_indices
from tailor.passes.cost import LayerShape
from tailor.rewriter.graph import TransformerGraph

KEEP = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)


def channel_scores(signals, layer: int) -> np.ndarray:
    return np.asarray(signals.down_importance[layer])


def _keep(graph: TransformerGraph, layer: int, kept: list[int]) -> Option:
    return Option(FfnPrune.name, layer, {"channels": kept}, (f"ffn:{layer}",),
                  label=f"layer {layer}: FFN keep {len(kept)}/{graph.blocks[layer].ffn.width}")


class FfnPrune(Pass):
    name = "ffn_prune"

    def candidates(self, graph: TransformerGraph, signals) -> list[Option]:
        out = []
        for b in graph.blocks:
            f = b.ffn
            if not sliceable(graph, f.projections):
                continue
            order = np.argsort(-channel_scores(signals, b.index), kind="stable")
            for keep in KEEP:
                n = max(8, int(round(f.width * keep / 8)) * 8)  # multiples of 8 stay kernel-friendly
                if n >= f.width:
                    continue
                out.append(_keep(graph, b.index, sorted(int(c) for c in order[:n])))
        return out

    def proxy(self, graph: TransformerGraph, option: Option, signals) -> float:
        # the kept channels are the most important: the removed ones a prefix of OBS's order,
        # whose compensated error is the largest of theirs
        error = np.asarray(signals.down_removal_error[option.layer])
        removed = np.ones(len(error), dtype=bool)
        removed[option.choice["channels"]] = False
        return float(error[removed].max()) * signals.ffn_contribution[option.layer] ** 2

    def from_plan(self, graph: TransformerGraph, layer: int, choice: dict) -> Option:
        f = graph.blocks[layer].ffn
        exact_keys(choice, {"channels"})
        if not sliceable(graph, f.projections):
            raise ValueError("this FFN's projections cannot be sliced")
        kept = sorted_indices(choice["channels"], f.width, "channels")
        if not 0 < len(kept) < f.width:
            raise ValueError(f"channels must keep between 1 and {f.width - 1} of {f.width}")
        return _keep(graph, layer, kept)

    def reshape(self, option: Option, shape: LayerShape) -> None:
        shape.ffn_width = len(option.choice["channels"])

    def apply(self, backend: Backend, options: list[Option], signals) -> None:
        for o in options:
            f = backend.graph.blocks[o.layer].ffn
            kept = o.choice["channels"]
            backend.set_ffn_width(o.layer, len(kept))
            for p in (f.gate, f.up):
                if p is not None:
                    backend.keep_outputs(p, kept)
            # the down projection refitted on the calibration Gram matrix; shapes only without it
            backend.keep_inputs(f.down, kept, signals.down_gram[o.layer] if signals is not None else None)
