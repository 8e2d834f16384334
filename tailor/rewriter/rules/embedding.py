"""Embeddings: table lookups that feed the first block's residual stream.

The token table is the gather indexed by the token-id input. Any other table added to it is a
learned position table (the one with more than a handful of rows) or an extra like BERT's
token types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tailor.rewriter import dataflow as df
from tailor.rewriter.dataflow import Dataflow, ParamRef


@dataclass
class EmbeddingSite:
    token: ParamRef
    token_node: Any
    position: ParamRef | None
    extra: list[ParamRef] = field(default_factory=list)


class EmbeddingRule:
    pattern = (df.GATHER,)

    def match(self, g: Dataflow, before: Any) -> EmbeddingSite | None:
        """Tables looked up before `before` (the first attention's first node)."""
        order = {id(n): i for i, n in enumerate(g.nodes())}
        limit = order[id(before)]
        inputs = {id(v) for v in g.graph_inputs().values()}
        tables = []
        for n in g.nodes():
            if order[id(n)] >= limit or g.op(n) != df.GATHER:
                continue
            ref = next((g.param(i) for i in g.inputs(n) if g.param(i) is not None), None)
            if ref is not None and len(ref.shape) == 2:
                tables.append((n, ref))
        token = next(((n, r) for n, r in tables
                      if any(id(g.skip_views_back(i)) in inputs for i in g.data_inputs(n))), None)
        if token is None:
            return None
        others = [r for n, r in tables if n is not token[0]]
        position = max((r for r in others if r.shape[0] > 16), key=lambda r: r.shape[0], default=None)
        extra = [r for r in others if r is not position]
        return EmbeddingSite(token[1], token[0], position, extra)


RULE = EmbeddingRule()
