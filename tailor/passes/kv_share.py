"""kv_share: layer j attends over the keys and values of an earlier layer i (CLA, KVSharer).

Layer j keeps its own queries and output projection; its key/value projections and its KV cache
go. Candidates pair j with the layer before it and with the earlier layer whose keys were most
similar on calibration data (KVSharer ranks pairs by similarity, then verifies; here the
verification is the measured KL every option gets). Layers with per-head q/k norms, fused or
Conv1D projections, or a different KV shape are not paired.
"""
from __future__ import annotations

import numpy as np

from tailor.backends.base import Backend
from tailor.passes.base import Option, Pass, edits_post_norm_branches, exact_keys, sliceable
from tailor.passes.cost import LayerShape
from tailor.rewriter.graph import Block, TransformerGraph


def _shareable(graph: TransformerGraph, block: Block) -> bool:
    # where a backend swaps the whole attention module (torch), a post-norm block's module would
    # take the residual add and norm with it; the ONNX rewrite only rewires the key/value projections
    return not block.attn.qk_norms and sliceable(graph, block.attn.projections) and \
        (block.residual == "pre_norm" or edits_post_norm_branches(graph))


def _share(layer: int, source: int) -> Option:
    return Option(KvShare.name, layer, {"source": source},
                  (f"attn:{layer}", f"attn:{source}", f"layer:{source}"),
                  label=f"layer {layer} reads layer {source}'s KV")


class KvShare(Pass):
    name = "kv_share"

    def first_layer(self, option: Option) -> int:
        return option.choice["source"]  # its keys and values are caught as the source computes them

    def candidates(self, graph: TransformerGraph, signals) -> list[Option]:
        out = []
        sim = np.asarray(signals.kv_similarity) if signals is not None else None
        for b in graph.blocks[1:]:
            j = b.index
            sources = {j - 1}
            if sim is not None and j > 1:
                sources.add(int(np.argmax(sim[j, :j])))
            for i in sorted(sources):
                src = graph.blocks[i]
                if not (_shareable(graph, b) and _shareable(graph, src)) or \
                        (src.attn.num_kv_heads, src.attn.head_dim) != (b.attn.num_kv_heads, b.attn.head_dim):
                    continue
                out.append(_share(j, i))
        return out

    def proxy(self, graph: TransformerGraph, option: Option, signals) -> float:
        # keys unlike the source's, weighted by how much the layer's attention writes
        sim = signals.kv_similarity[option.layer][option.choice["source"]]
        return (1.0 - sim) * signals.attn_contribution[option.layer] ** 2

    def from_plan(self, graph: TransformerGraph, layer: int, choice: dict) -> Option:
        exact_keys(choice, {"source"})
        i = choice["source"]
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < layer:
            raise ValueError(f"source must be an earlier layer (0..{layer - 1}), got {i!r}")
        own, src = graph.blocks[layer], graph.blocks[i]
        if not (_shareable(graph, own) and _shareable(graph, src)):
            raise ValueError("these layers' attention cannot share a KV cache")
        if (src.attn.num_kv_heads, src.attn.head_dim) != (own.attn.num_kv_heads, own.attn.head_dim):
            raise ValueError(f"layer {i}'s KV heads have another shape")
        return _share(layer, i)

    def reshape(self, option: Option, shape: LayerShape) -> None:
        shape.own_kv = False

    def apply(self, backend: Backend, options: list[Option], signals) -> None:
        for o in options:
            backend.share_kv(o.layer, o.choice["source"])
