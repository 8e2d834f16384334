"""From an attention operand back to the linear layer that made it.

Between a q/k/v projection and the attention op sit only layout ops (split heads, repeat_kv),
a slice of a fused qkv output, a constant scale, and RoPE:

    rope(x) = x * cos + rotate_half(x) * sin

An add whose two operands both come from the same projection is that rotation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tailor.rewriter import dataflow as df
from tailor.rewriter.dataflow import Dataflow

_THROUGH = {df.VIEW, df.ADD, df.SUB, df.MUL, df.DIV, df.NEG, df.CONCAT, df.SLICE, df.SPLIT,
            df.LAYER_NORM, df.RMS_NORM}


@dataclass(frozen=True)
class Source:
    linear: Any                      # the backend node
    columns: tuple[int, int] | None  # output columns used, for a fused projection


@dataclass
class Trace:
    sources: set[Source]
    rope: bool
    norms: list[Any]          # norm sites passed through (QK-norm)


def trace_projection(g: Dataflow, value, norm_outputs: dict[int, Any]) -> Trace:
    """Every linear feeding `value` without crossing another linear or a non-elementwise op,
    with the columns a split selected on the way. Per-head norms on the way (QK-norm, as in
    Qwen3 and Gemma 3) are walked through and reported: `norm_outputs` maps id(value) -> site."""
    rope = False
    norms: list[Any] = []

    def walk(v, ranges: tuple, depth: int) -> set[Source]:
        nonlocal rope
        if v is None or depth > 40:
            return set()
        site = norm_outputs.get(id(v))
        if site is not None and all(n is not site for n in norms):
            norms.append(site)
        node = g.producer(v)
        if node is None:
            return set()
        op = g.op(node)
        if op == df.LINEAR:
            out = g.linear(node).out_features
            cols = next(((a, b) for a, b, w in reversed(ranges) if w == out), None)
            return {Source(node, cols)}
        if op not in _THROUGH:
            return set()
        if op in (df.SLICE, df.SPLIT):
            r = g.split_range(node, v)
            ranges = ranges + ((r,) if r is not None else ())
        parts = [walk(i, ranges, depth + 1) for i in g.data_inputs(node)]
        if op in (df.ADD, df.SUB) and len(parts) == 2 and parts[0] and parts[0] == parts[1]:
            rope = True
        return _merge(set().union(*parts)) if parts else set()

    sources = walk(value, (), 0)
    return Trace(sources, rope, norms)


def _merge(found: set[Source]) -> set[Source]:
    """One source per linear: a path that read all its columns (x * cos beside rotate_half(x))
    wins over a partial one."""
    merged: dict[int, Source] = {}
    for s in found:
        prev = merged.get(id(s.linear))
        if prev is None:
            merged[id(s.linear)] = s
        elif prev.columns is None or s.columns is None:
            merged[id(s.linear)] = Source(s.linear, None)
        elif s.columns[1] - s.columns[0] > prev.columns[1] - prev.columns[0]:
            merged[id(s.linear)] = s
    return set(merged.values())
