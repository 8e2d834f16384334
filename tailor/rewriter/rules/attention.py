"""Attention cores: one fused op (aten SDPA, ONNX Attention), or its decomposition

    scores = (q @ k^T) * scale (+ mask | where(mask, scores, -inf));  p = softmax(scores);  out = p @ v

as torch.onnx.export(dynamo=True) and HF's eager attention produce it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tailor.rewriter import dataflow as df
from tailor.rewriter.dataflow import Dataflow
from tailor.rewriter.rules import match_all


@dataclass
class AttentionSite:
    q: Any
    k: Any
    v: Any
    out: Any
    mask: Any | None
    causal: bool
    kind: str          # "sdpa" | "decomposed"
    nodes: list[str]


class FusedAttentionRule:
    pattern = (df.ATTENTION,)

    def match(self, g: Dataflow, node) -> AttentionSite | None:
        info = g.attention(node)
        causal = info.is_causal or is_causal_mask(g, info.mask)
        return AttentionSite(info.q, info.k, info.v, g.output(node), info.mask, causal, "sdpa",
                             [g.node_name(node)])


class DecomposedAttentionRule:
    pattern = (df.SOFTMAX,)
    # between q@k^T and softmax: scaling, masking, layout
    _SCORE_OPS = {df.VIEW, df.ADD, df.SUB, df.MUL, df.DIV, df.WHERE}

    def match(self, g: Dataflow, node) -> AttentionSite | None:
        (scores,) = g.data_inputs(node)[:1] or (None,)
        found = self._scores_matmul(g, scores, set())
        if found is None:
            return None
        qk, mask = found
        pv = self._probs_matmul(g, g.output(node))
        if pv is None:
            return None
        q, k = g.data_inputs(qk)[:2]
        p_side, v = g.data_inputs(pv)[:2]
        causal = is_causal_mask(g, mask)
        return AttentionSite(q, k, v, self._past_output_guard(g, g.output(pv)), mask, causal, "decomposed",
                             [g.node_name(n) for n in (qk, node, pv)])

    @staticmethod
    def _past_output_guard(g: Dataflow, out):
        """The attention's output past a NaN guard on it, where(isnan(out), 0, out), which
        tailor.rewriter.cleanup moves there from the probabilities."""
        users = list(g.consumers(out))
        guard = [c for c in users if g.op(c) == df.WHERE]
        if len(users) == 2 and len(guard) == 1:
            test = next(c for c in users if c is not guard[0])
            if any(x is y for x in g.outputs(test) for y in g.inputs(guard[0])):
                return g.output(guard[0])
        return out

    def _scores_matmul(self, g: Dataflow, value, seen):
        """Walk back from the softmax input to q@k^T; the other operand of an add/where is the mask."""
        node = g.producer(value)
        if node is None or id(node) in seen or len(seen) > 12:
            return None
        seen.add(id(node))
        if g.op(node) == df.MATMUL:
            return node, None
        if g.op(node) not in self._SCORE_OPS:
            return None
        ins = g.data_inputs(node)
        for i, v in enumerate(ins):
            found = self._scores_matmul(g, v, seen)
            if found is not None:
                mm, mask = found
                if mask is None and g.op(node) in (df.ADD, df.WHERE) and len(ins) > 1:
                    others = [o for j, o in enumerate(ins) if j != i]
                    mask = others[0]
                if mask is None and g.op(node) in (df.ADD, df.WHERE):
                    consts = [x for x in g.inputs(node) if x is not None and g.constant(x) is not None
                              and g.constant(x).size > 1]
                    mask = consts[0] if consts else None
                return mm, mask
        return None

    @staticmethod
    def _probs_matmul(g: Dataflow, value):
        """Walk forward from the softmax output (NaN guards, dropout, casts) to probs @ v."""
        frontier = [value]
        for _ in range(6):
            nxt = []
            for v in frontier:
                for c in g.consumers(v):
                    op = g.op(c)
                    if op == df.MATMUL and g.data_inputs(c) and g.data_inputs(c)[0] is v:
                        return c
                    if op in (df.VIEW, df.WHERE, df.MUL):
                        nxt.extend(g.outputs(c))
            frontier = nxt
        return None


# how many nodes the search for a causal comparison above a mask may visit: an Optimum export with a
# KV cache builds its mask from the past length, and the walk from a deep layer's mask met its
# LessOrEqual only at the 404th node (a bound, not the graph: the walk runs once per layer)
MASK_SEARCH_NODES = 2000


def is_causal_mask(g: Dataflow, mask) -> bool:
    """Does this mask hide the future? Built from position comparisons (i <= j) or tril, or a
    constant lower-triangular matrix, or from one (an export of fixed length folds the comparison
    into a constant, then combines it with others). Padding masks compare against constants, so
    they don't count."""
    if mask is None:
        return False
    const = g.constant(mask)
    if const is not None:
        return _lower_triangular(const)
    stack, seen = [mask], set()
    while stack and len(seen) < MASK_SEARCH_NODES:
        v = stack.pop()
        folded = g.constant(v)
        if folded is not None and _lower_triangular(folded):
            return True
        node = g.producer(v)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if g.op(node) == df.TRIANGLE:
            return True
        if g.op(node) == df.COMPARE and len([i for i in g.inputs(node) if g.is_dynamic(i)]) == 2:
            return True
        stack.extend(i for i in g.inputs(node) if i is not None)
    return False


def _lower_triangular(m: np.ndarray) -> bool:
    if m.ndim < 2 or m.shape[-1] < 2 or m.shape[-2] < 2:
        return False
    m2 = m.reshape(-1, *m.shape[-2:])[0]
    blocked = ~m2 if m2.dtype == bool else m2 < -1e4
    upper = np.triu(np.ones_like(blocked, dtype=bool), k=1)
    return bool(blocked[upper].all() and not blocked[~upper].any())


RULES = (FusedAttentionRule(), DecomposedAttentionRule())


def find_attention(g: Dataflow) -> list[AttentionSite]:
    return match_all(g, RULES)
