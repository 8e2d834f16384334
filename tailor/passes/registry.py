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


def options_from_plan(graph: TransformerGraph, rewrites: list[dict], where: str = "plan") -> list[Option]:
    """The options a plan's rewrites name, each checked against this graph: known pass, layer in
    range, a choice the pass can apply here, and no two rewrites claiming the same part."""
    from tailor.core.errors import TailorError

    options, claimed = [], {}
    for n, r in enumerate(rewrites):
        what = f"{where}: rewrite {n} ({r.get('pass')!r} on layer {r.get('layer')!r})"
        if r["pass"] not in PASSES:
            raise TailorError(f"{what}: unknown pass; known: {', '.join(PASSES)}")
        if not 0 <= r["layer"] < graph.num_layers:
            raise TailorError(f"{what}: the model has layers 0..{graph.num_layers - 1}; "
                              f"is the plan for another model?")
        try:
            option = PASSES[r["pass"]].from_plan(graph, r["layer"], r["choice"])
        except ValueError as e:
            raise TailorError(f"{what}: {e}") from None
        for c in option.claims:
            if c in claimed:
                raise TailorError(f"{what}: conflicts with rewrite {claimed[c]} (both change {c})")
            claimed[c] = n
        options.append(option)
    return options
