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

from tailor.backends.base import Backend
from tailor.core.errors import TailorError
from tailor.passes.base import Option, Pass, edits_post_norm_branches, exact_keys, sliceable, sorted_indices
from tailor.passes.cost import LayerShape
from tailor.rewriter.graph import Attention, TransformerGraph


def head_scores(graph: TransformerGraph, signals, layer: int) -> np.ndarray:
    """Importance per query head, shape [kv_heads, queries_per_group]."""
    a = graph.blocks[layer].attn
    return np.asarray(signals.o_importance[layer]).reshape(a.num_kv_heads, a.num_heads // a.num_kv_heads)


def _choice(scores: np.ndarray, groups: int, per_group: int) -> dict:
    order = np.argsort(-scores.sum(1), kind="stable")[:groups]
    kept = sorted(int(g) for g in order)
    queries = [sorted(int(q) for q in np.argsort(-scores[g], kind="stable")[:per_group]) for g in kept]
    return {"kv_heads": kept, "queries": queries}


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


def _droppable(graph: TransformerGraph, layer: int) -> bool:
    """Whether the layer's attention may become a constant branch (not a post-norm block on a
    backend that cannot edit its branch alone)."""
    return graph.blocks[layer].residual != "post_norm" or edits_post_norm_branches(graph)


def _keep(graph: TransformerGraph, layer: int, choice: dict) -> Option:
    a = graph.blocks[layer].attn
    g, q_per = len(choice["kv_heads"]), a.num_heads // a.num_kv_heads
    label = "drop attention" if g == 0 else \
        f"keep {g}/{a.num_kv_heads} KV × {len(choice['queries'][0])}/{q_per} q"
    return Option(HeadPrune.name, layer, choice, (f"attn:{layer}",), label=f"layer {layer}: {label}")


class HeadPrune(Pass):
    name = "head_prune"

    def candidates(self, graph: TransformerGraph, signals) -> list[Option]:
        out = []
        for b in graph.blocks:
            a = b.attn
            if not sliceable(graph, a.projections):
                continue
            q_per = a.num_heads // a.num_kv_heads
            scores = head_scores(graph, signals, b.index)
            first = 0 if _droppable(graph, b.index) else 1
            for g in range(first, a.num_kv_heads + 1):
                for m in ([0] if g == 0 else range(1, q_per + 1)):
                    if (g, m) != (a.num_kv_heads, q_per):
                        out.append(_keep(graph, b.index, _choice(scores, g, m) if g else
                                         {"kv_heads": [], "queries": []}))
        return out

    def proxy(self, graph: TransformerGraph, option: Option, signals) -> float:
        # OBS's compensated error at the last removed head (removed heads need not be a prefix of
        # its order: grouped-query choices keep whole groups, so this is a lower bound)
        a = graph.blocks[option.layer].attn
        q_per = a.num_heads // a.num_kv_heads
        error = np.asarray(signals.o_removal_error[option.layer])
        removed = np.ones(a.num_heads, dtype=bool)
        removed[[g * q_per + q for g, qs in zip(option.choice["kv_heads"], option.choice["queries"])
                 for q in qs]] = False
        return float(error[removed].max()) * signals.attn_contribution[option.layer] ** 2

    def from_plan(self, graph: TransformerGraph, layer: int, choice: dict) -> Option:
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
            raise ValueError(f"a post-norm attention cannot be dropped whole on a {graph.backend} model")
        if len(kept) == a.num_kv_heads and len(queries[0]) == q_per:
            raise ValueError("the choice keeps every head: it prunes nothing")
        return _keep(graph, layer, {"kv_heads": kept, "queries": queries})

    def reshape(self, option: Option, shape: LayerShape) -> None:
        kept = option.choice["kv_heads"]
        shape.kv_groups = len(kept)
        shape.queries_per_group = len(option.choice["queries"][0]) if kept else 0

    def apply(self, backend: Backend, options: list[Option], signals) -> None:
        for o in options:
            a = backend.graph.blocks[o.layer].attn
            if not o.choice["kv_heads"]:  # the whole attention branch becomes its mean output
                mean = signals.attn_mean[o.layer] if signals is not None else None
                backend.constant_branch(o.layer, "attn", mean)
                continue
            q_cols, kv_cols = kept_columns(a, o)
            backend.set_heads(o.layer, len(o.choice["kv_heads"]), len(o.choice["queries"][0]))
            backend.keep_outputs(a.q, q_cols)
            backend.keep_outputs(a.k, kv_cols)
            backend.keep_outputs(a.v, kv_cols)
            # the output projection refitted on the calibration Gram matrix; shapes only without it
            backend.keep_inputs(a.o, q_cols, signals.o_gram[o.layer] if signals is not None else None)
