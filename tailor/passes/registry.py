"""The rewrite passes the search may combine. A new pass is one file and one line here."""
from __future__ import annotations

from tailor.passes import attn_pattern, ffn_prune, ffn_skip, head_prune, kv_share, layer_skip
from tailor.passes.base import Option
from tailor.rewriter.graph import TransformerGraph

PASSES = {m.NAME: m for m in (layer_skip, ffn_skip, ffn_prune, head_prune, kv_share, attn_pattern)}
# per-layer edits first, then layer removal (which renumbers the layers)
APPLY_ORDER = ("head_prune", "attn_pattern", "ffn_prune", "ffn_skip", "kv_share", "layer_skip")


def candidates_for(graph: TransformerGraph, signals, passes: list[str]) -> list[Option]:
    out = []
    for name in passes:
        out.extend(PASSES[name].candidates(graph, signals))
    return out
