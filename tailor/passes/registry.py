"""The rewrite passes the search may combine. A new pass is one file and one line here."""
from __future__ import annotations

from tailor.backends.base import Backend
from tailor.core.errors import TailorError
from tailor.passes.attn_pattern import AttnPattern
from tailor.passes.base import Option, Pass
from tailor.passes.ffn_prune import FfnPrune
from tailor.passes.ffn_skip import FfnSkip
from tailor.passes.head_prune import HeadPrune
from tailor.passes.int8 import Int8
from tailor.passes.kv_share import KvShare
from tailor.passes.layer_skip import LayerSkip
from tailor.rewriter.graph import TransformerGraph

PASSES: dict[str, Pass] = {p.name: p for p in (LayerSkip(), FfnSkip(), FfnPrune(), HeadPrune(), KvShare(),
                                                 AttnPattern(), Int8())}
# per-layer edits first, then layer removal (which renumbers the layers); int8 only names the
# projections the backend quantizes after all of them
APPLY_ORDER = ("head_prune", "attn_pattern", "ffn_prune", "ffn_skip", "kv_share", "int8", "layer_skip")


def candidates_for(graph: TransformerGraph, signals, passes: list[str]) -> list[Option]:
    out = []
    for name in passes:
        out.extend(PASSES[name].candidates(graph, signals))
    return out


def takes(backend: Backend, option: Option) -> bool:
    """Whether this backend's model can take the option (Pass.check: beyond what the graph says,
    e.g. an LM head held as a Gemm, which INT8 does not run)."""
    try:
        PASSES[option.pass_name].check(backend, option)
    except ValueError:
        return False
    return True


def offered(backend: Backend, signals, passes: list[str]) -> list[Option]:
    """The options of `passes` this backend's model can take."""
    return [o for o in candidates_for(backend.graph, signals, passes) if takes(backend, o)]


def apply_options(backend: Backend, options: list[Option], signals) -> Backend:
    """Apply options of several passes to `backend` in place, in the order that keeps indices
    valid; returns it."""
    for name in APPLY_ORDER:
        chosen = [o for o in options if o.pass_name == name]
        if chosen:
            PASSES[name].apply(backend, chosen, signals)
    backend.finish()
    return backend


def options_from_plan(graph: TransformerGraph, rewrites: list[dict], where: str = "plan",
                      backend: Backend | None = None) -> list[Option]:
    """The options a plan's rewrites name, each checked against this graph (and where given, the
    backend's model): known pass, layer in range, a choice the pass can apply here, and no two
    rewrites claiming the same part."""
    options, claimed = [], {}
    for n, r in enumerate(rewrites):
        what = f"{where}: rewrite {n} ({r.get('pass')!r} on layer {r.get('layer')!r})"
        if r["pass"] not in PASSES:
            raise TailorError(f"{what}: unknown pass; known: {', '.join(PASSES)}")
        head = graph.num_layers if PASSES[r["pass"]].reaches_head and graph.lm_head is not None else None
        if not (0 <= r["layer"] < graph.num_layers or r["layer"] == head):
            also = f" ({head}: its LM head)" if head is not None else ""
            raise TailorError(f"{what}: the model has layers 0..{graph.num_layers - 1}{also}; "
                              f"is the plan for another model?")
        try:
            option = PASSES[r["pass"]].from_plan(graph, r["layer"], r["choice"])
            if backend is not None:
                PASSES[r["pass"]].check(backend, option)
        except ValueError as e:
            raise TailorError(f"{what}: {e}") from None
        for c in option.claims:
            if c in claimed:
                raise TailorError(f"{what}: conflicts with rewrite {claimed[c]} (both change {c})")
            claimed[c] = n
        options.append(option)
    return options
