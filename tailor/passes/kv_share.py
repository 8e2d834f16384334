"""kv_share: layer j attends over the keys and values of an earlier layer i (CLA, KVSharer).

Layer j keeps its own queries and output projection; its key/value projections and its KV cache
go. Candidates pair j with the layer before it and with the earlier layer whose keys were most
similar on calibration data (KVSharer ranks pairs by similarity, then verifies; here the
verification is the measured KL every option gets). Layers with per-head q/k norms, fused or
Conv1D projections, or a different KV shape are not paired.
"""
from __future__ import annotations

import numpy as np

from tailor.passes.base import Option, exact_keys, sliceable
from tailor.passes.cost import LayerShape
from tailor.rewriter import onnx_surgery
from tailor.rewriter.graph import Block, TransformerGraph
from tailor.rewriter.modules.shared_kv import SharedKVAttention
from tailor.rewriter.torch_surgery import attention_path, module_path, set_module

NAME = "kv_share"


def _shareable(graph: TransformerGraph, block: Block) -> bool:
    # on torch the whole attention module is swapped, which in post-norm models would take the
    # residual add and norm with it; the ONNX rewrite only rewires the key/value projections
    return not block.attn.qk_norms and sliceable(graph, block.attn.projections) and \
        (graph.backend == "onnx" or block.residual == "pre_norm")


def candidates(graph: TransformerGraph, signals) -> list[Option]:
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


def _share(layer: int, source: int) -> Option:
    return Option(NAME, layer, {"source": source}, (f"attn:{layer}", f"attn:{source}", f"layer:{source}"),
                  label=f"layer {layer} reads layer {source}'s KV")


def from_plan(graph: TransformerGraph, layer: int, choice: dict) -> Option:
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


def reshape(option: Option, shape: LayerShape) -> None:
    shape.own_kv = False


def apply_torch(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    for o in options:
        own, src = graph.blocks[o.layer], graph.blocks[o.choice["source"]]
        path = attention_path(model, own)
        attn = model.get_submodule(path)
        rel = len(path) + 1
        shared = SharedKVAttention(attn, own, model.get_submodule(module_path(src.attn.k.weight.name)),
                                   model.get_submodule(module_path(src.attn.v.weight.name)),
                                   module_path(own.attn.q.weight.name)[rel:],
                                   module_path(own.attn.o.weight.name)[rel:])
        set_module(model, path, shared)


def apply_onnx(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    """Layer j's key and value projections' outputs are replaced by layer i's: j still applies its
    own position encoding and head layout to them, exactly as SharedKVAttention does."""
    nodes = onnx_surgery.nodes_by_name(model)
    for o in options:
        own, src = graph.blocks[o.layer].attn, graph.blocks[o.choice["source"]].attn
        for mine, theirs in ((own.k, src.k), (own.v, src.v)):
            onnx_surgery.bypass(model, onnx_surgery.linear_output(nodes[mine.node]),
                                onnx_surgery.linear_output(nodes[theirs.node]))
