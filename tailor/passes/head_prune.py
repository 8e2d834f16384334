"""head_prune: structured attention-head pruning, GQA-aware, with bias compensation (FLAP).

Query heads are ranked by what removing them costs once the output projection's kept columns
are refitted: a greedy optimal brain surgeon over the projection's head-sized column groups
(tailor.passes.obs). On refllama-16m it halved the refit error of several layers' 4-of-6 and
2-of-6 head choices against FLAP's fluctuation metric (Var(x_c) · ||W_o[:, c]||² summed over a
head), which cannot see that two heads write the same thing. A choice keeps the g most
important KV groups (summed importance) and, inside each, the m most important query heads
(the same m in every group, so grouped-query attention stays regular). The output projection's
kept columns and its bias are refitted by least squares on calibration statistics (FLAP's bias
compensation generalised: the removed heads' mean contribution is its uncorrelated special
case). Keeping no group at all replaces the attention branch by its mean output.
"""
from __future__ import annotations

import numpy as np
import torch

from tailor.core.errors import TailorError
from tailor.passes.base import Option, exact_keys, sliceable, sorted_indices
from tailor.passes.cost import LayerShape
from tailor.rewriter import onnx_surgery
from tailor.rewriter.graph import Attention, TransformerGraph
from tailor.rewriter.torch_surgery import (
    add_bias,
    attention_path,
    reconstruct_inputs,
    replace_with_constant,
    slice_linear,
)

NAME = "head_prune"


def head_scores(graph: TransformerGraph, signals, layer: int) -> np.ndarray:
    """Importance per query head, shape [kv_heads, queries_per_group]."""
    a = graph.blocks[layer].attn
    return np.asarray(signals.o_importance[layer]).reshape(a.num_kv_heads, a.num_heads // a.num_kv_heads)


def _choice(scores: np.ndarray, groups: int, per_group: int) -> dict:
    order = np.argsort(-scores.sum(1), kind="stable")[:groups]
    kept = sorted(int(g) for g in order)
    queries = [sorted(int(q) for q in np.argsort(-scores[g], kind="stable")[:per_group]) for g in kept]
    return {"kv_heads": kept, "queries": queries}


def candidates(graph: TransformerGraph, signals) -> list[Option]:
    out = []
    for b in graph.blocks:
        a = b.attn
        if not sliceable(graph, a.projections):
            continue
        q_per = a.num_heads // a.num_kv_heads
        scores = head_scores(graph, signals, b.index)
        # on torch, a post-norm attention module holds its residual add and norm: it cannot
        # become a constant branch (the ONNX rewrite replaces the branch itself)
        first = 0 if _droppable(graph, b.index) else 1
        for g in range(first, a.num_kv_heads + 1):
            for m in ([0] if g == 0 else range(1, q_per + 1)):
                if (g, m) != (a.num_kv_heads, q_per):
                    out.append(_keep(graph, b.index, _choice(scores, g, m) if g else
                                     {"kv_heads": [], "queries": []}))
    return out


def _droppable(graph: TransformerGraph, layer: int) -> bool:
    # on torch, a post-norm attention module holds its residual add and norm: it cannot
    # become a constant branch (the ONNX rewrite replaces the branch itself)
    return not (graph.backend == "torch" and graph.blocks[layer].residual == "post_norm")


def _keep(graph: TransformerGraph, layer: int, choice: dict) -> Option:
    a = graph.blocks[layer].attn
    g, q_per = len(choice["kv_heads"]), a.num_heads // a.num_kv_heads
    label = "drop attention" if g == 0 else \
        f"keep {g}/{a.num_kv_heads} KV × {len(choice['queries'][0])}/{q_per} q"
    return Option(NAME, layer, choice, (f"attn:{layer}",), label=f"layer {layer}: {label}")


def from_plan(graph: TransformerGraph, layer: int, choice: dict) -> Option:
    a = graph.blocks[layer].attn
    q_per = a.num_heads // a.num_kv_heads
    exact_keys(choice, {"kv_heads", "queries"})
    if not sliceable(graph, a.projections):
        raise ValueError("this attention's projections cannot be sliced")
    kept = sorted_indices(choice["kv_heads"], a.num_kv_heads, "kv_heads")
    queries = choice["queries"]
    if not isinstance(queries, list) or len(queries) != len(kept):
        raise ValueError("queries must hold one list of query heads per kept KV head")
    queries = [sorted_indices(q, q_per, "queries") for q in queries]
    if len({len(q) for q in queries}) > 1 or (queries and not queries[0]):
        raise ValueError("every kept KV head keeps the same number (≥ 1) of query heads")
    if not kept and not _droppable(graph, layer):
        raise ValueError("a post-norm attention cannot be dropped whole on a torch model")
    if len(kept) == a.num_kv_heads and len(queries[0]) == q_per:
        raise ValueError("the choice keeps every head: it prunes nothing")
    return _keep(graph, layer, {"kv_heads": kept, "queries": queries})


def reshape(option: Option, shape: LayerShape) -> None:
    kept = option.choice["kv_heads"]
    shape.kv_groups = len(kept)
    shape.queries_per_group = len(option.choice["queries"][0]) if kept else 0


def kept_columns(a: Attention, o: Option) -> tuple[torch.Tensor, torch.Tensor]:
    """The q/o channels and the k/v channels an option keeps."""
    q_per, d = a.num_heads // a.num_kv_heads, a.head_dim
    kept_groups, queries = o.choice["kv_heads"], o.choice["queries"]
    if len({len(qs) for qs in queries}) != 1 or len(queries) != len(kept_groups):
        raise TailorError(f"layer {o.layer}: every kept KV group must keep the same number of query "
                          f"heads (grouped-query attention), got {queries}")
    q_heads = [g * q_per + q for g, qs in zip(kept_groups, queries) for q in qs]
    q_cols = torch.tensor([h * d + i for h in q_heads for i in range(d)], dtype=torch.long)
    kv_cols = torch.tensor([g * d + i for g in kept_groups for i in range(d)], dtype=torch.long)
    return q_cols, kv_cols


def apply_onnx(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    values = onnx_surgery.block_values(model, graph)
    for o in options:
        b = graph.blocks[o.layer]
        a = b.attn
        if not o.choice["kv_heads"]:
            mean = signals.attn_mean[o.layer] if signals is not None else np.zeros(graph.hidden_size)
            onnx_surgery.replace_with_constant(model, values[o.layer].attn_out, mean)
            continue
        q_cols, kv_cols = kept_columns(a, o)
        onnx_surgery.set_head_counts(model, b, len(q_cols) // a.head_dim, len(kv_cols) // a.head_dim)
        onnx_surgery.slice_projection(model, a.q, rows=q_cols.numpy())
        onnx_surgery.slice_projection(model, a.k, rows=kv_cols.numpy())
        onnx_surgery.slice_projection(model, a.v, rows=kv_cols.numpy())
        if signals is not None:
            onnx_surgery.reconstruct_inputs(model, a.o, q_cols, signals.o_gram[o.layer])
        else:  # shapes only (the cost model's timing variants)
            onnx_surgery.drop_inputs(model, a.o, q_cols.numpy())


def apply_torch(model, graph: TransformerGraph, options: list[Option], signals) -> None:
    for o in options:
        b = graph.blocks[o.layer]
        a = b.attn
        q_per = a.num_heads // a.num_kv_heads
        kept_groups, queries = o.choice["kv_heads"], o.choice["queries"]
        if not kept_groups:  # the whole attention branch becomes its mean output
            replace_with_constant(model, attention_path(model, b), graph.hidden_size, returns_tuple=True,
                                  mean=signals.attn_mean[o.layer] if signals is not None else None)
            continue
        q_cols, kv_cols = kept_columns(a, o)
        slice_linear(model, a.q, rows=q_cols)
        slice_linear(model, a.k, rows=kv_cols)
        slice_linear(model, a.v, rows=kv_cols)
        if signals is not None:
            reconstruct_inputs(model, a.o, q_cols, signals.o_gram[o.layer])
        else:  # reload: shapes only, the weights come from the artifact
            slice_linear(model, a.o, cols=q_cols)
            add_bias(model, a.o, torch.zeros(a.o.out_features))
        attn = model.get_submodule(attention_path(model, b))
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = len(queries[0])
        elif len(queries[0]) != q_per:
            raise TailorError(f"layer {o.layer}: {type(attn).__name__} has no num_key_value_groups; "
                              f"only whole KV groups can be pruned there")
