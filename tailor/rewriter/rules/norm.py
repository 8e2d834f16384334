"""Normalisation layers: fused LayerNorm/RMSNorm ops, and their decompositions.

    RMSNorm:   w * (x * rsqrt(mean(x^2) + eps))            (or x / sqrt(...), x * 1/sqrt(...))
    LayerNorm: w * ((x - mean(x)) / sqrt(var + eps)) + b
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tailor.rewriter import dataflow as df
from tailor.rewriter.dataflow import Dataflow
from tailor.rewriter.graph import Norm
from tailor.rewriter.rules import match_all

# ops that may appear between mean(x^2) and the normalised value
_STATS_OPS = {df.ADD, df.SQRT, df.RSQRT, df.RECIPROCAL, df.DIV, df.MUL, df.VIEW, df.SUB,
              df.POW, df.REDUCE_MEAN}


@dataclass
class NormSite:
    norm: Norm
    input: Any      # the value normalised
    output: Any     # the normalised (and scaled, shifted) value


class FusedNormRule:
    pattern = (df.LAYER_NORM, df.RMS_NORM)

    def match(self, g: Dataflow, node) -> NormSite | None:
        kind = "layer" if g.op(node) == df.LAYER_NORM else "rms"
        w, b = g.layer_norm_params(node)
        x = g.data_inputs(node)[0]
        return NormSite(Norm(kind, w, b, [g.node_name(node)]), x, g.output(node))


class DecomposedNormRule:
    pattern = (df.REDUCE_MEAN,)

    def match(self, g: Dataflow, node) -> NormSite | None:
        (src,) = g.data_inputs(node) or (None,)
        if src is None:
            return None
        prod = g.producer(g.skip_views_back(src))
        if prod is not None and _is_square(g, prod):
            kind, x = "rms", g.data_inputs(prod)[0]
            centred = x
        else:
            sub = next((c for c, _ in g.view_consumers(g.output(node)) if g.op(c) == df.SUB), None)
            if sub is None:
                return None  # a plain mean (pooling), not a norm
            kind, x, centred = "layer", src, g.output(sub)
            # the variance: mean((x - mean)^2) must follow
            if not any(g.op(c) == df.POW or _is_square(g, c) for c, _ in g.view_consumers(centred)):
                return None
        normed, nodes = self._normalised(g, node, x, centred)
        if normed is None:
            return None
        out, w, b, offset = g.output(normed), None, None, 0.0
        scale = self._affine(g, out, df.MUL)
        if scale is not None:
            w, offset, out = scale
            nodes.append(g.node_name(g.producer(out)))
            shift = self._affine(g, out, df.ADD)
            if shift is not None:
                b, _, out = shift
                nodes.append(g.node_name(g.producer(out)))
        return NormSite(Norm(kind, w, b, nodes, offset), x, out)

    @staticmethod
    def _normalised(g: Dataflow, mean_node, x, centred):
        """The op that scales x (or x - mean) by the reciprocal RMS/std computed from mean_node."""
        frontier, seen, nodes = [g.output(mean_node)], set(), [g.node_name(mean_node)]
        while frontier and len(seen) < 16:
            v = frontier.pop(0)
            for c in g.consumers(v):
                if id(c) in seen or g.op(c) not in _STATS_OPS:
                    continue
                seen.add(id(c))
                nodes.append(g.node_name(c))
                ins = g.data_inputs(c)
                if g.op(c) in (df.MUL, df.DIV) and len(ins) == 2 and any(
                        g.same_value(i, x) or g.same_value(i, centred) for i in ins) and \
                        not any(g.same_value(i, v) for i in ins[:1] if g.op(c) == df.DIV):
                    return c, nodes
                frontier.extend(g.outputs(c))
        return None, nodes

    @staticmethod
    def _affine(g: Dataflow, value, op):
        """The scale (op MUL) or shift (op ADD) applied to `value`: (weight, offset, output).
        A scale of (1 + w), as in Gemma, is the weight w with offset 1."""
        cons = [c for c, _ in g.view_consumers(value)]
        if len(cons) != 1 or g.op(cons[0]) != op:
            return None
        node = cons[0]
        others = [i for i in g.inputs(node) if i is not None and not g.same_value(i, value)]
        if len(others) != 1:
            return None
        src = g.skip_views_back(others[0])
        ref, offset = g.param(src), 0.0
        shifted = g.producer(src)
        if ref is None and op == df.MUL and shifted is not None and g.op(shifted) == df.ADD:
            refs = [r for r in (g.param(g.skip_views_back(i)) for i in g.inputs(shifted)) if r]
            if len(refs) == 1 and g.scalar_operand(shifted) is not None:
                ref, offset = refs[0], g.scalar_operand(shifted)
        if ref is None or len(ref.shape) != 1:
            return None
        return ref, offset, g.output(node)


def _is_square(g: Dataflow, node) -> bool:
    if g.op(node) == df.POW:
        return g.scalar_operand(node) == 2.0
    if g.op(node) == df.MUL:
        ins = g.data_inputs(node)
        return len(ins) == 2 and ins[0] is ins[1]
    return False


RULES = (FusedNormRule(), DecomposedNormRule())


def find_norms(g: Dataflow) -> list[NormSite]:
    return match_all(g, RULES)
