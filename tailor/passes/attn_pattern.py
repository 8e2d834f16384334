"""attn_pattern: a sparse attention pattern per KV head (MoA, DuoAttention, RazorAttention).

Each KV head keeps all its keys (dense) or a sink plus a window that grows with the length,
from a grid (tailor.core.patterns.Pattern). The profile measures, per layer, KV
head and pattern, the divergence masking that head costs (tailor.passes.attention_profile).

A layer uses at most two distinct patterns (dense counts as one), so its heads can be permuted
into two contiguous groups with one pattern each: kernels and onnxruntime run each group as one
call. The options of a layer enumerate that space exactly under additive per-head losses: for a
pair of patterns (a, b) and r heads on b, the best r heads are those losing least by moving from
a to b; plus every pattern on all heads. The search picks one option per layer (claim attn:L, so
it excludes head pruning and KV sharing of that layer); dominated options are dropped there.
"""
from __future__ import annotations

import itertools

import numpy as np

from tailor.backends.base import Backend
from tailor.core.patterns import Pattern
from tailor.passes.base import Option, Pass, exact_keys
from tailor.passes.cost import LayerShape
from tailor.rewriter.graph import TransformerGraph


def default_grid(longest: int) -> list[Pattern]:
    """Sink S (a power of two near N/24, 4..64: 64 at N = 1536) and windows S, 2S or 4S, static
    or growing by N/8, N/4, N/2: window(N) = alpha + beta * N. The 2S step is there for budgets
    near the narrowest plan: on refllama-16m at density 0.25 the S → 4S step (+0.013 density a
    head) left 0.011 unspent; with S → 2S (+0.007) the search widened five more heads and
    retrieval went 0.89 → 0.92 (docs/BENCHMARKS.md)."""
    sink = int(min(64, max(4, 2 ** round(np.log2(longest / 24)))))
    return [Pattern(sink, a, b) for b in (0.0, 0.125, 0.25, 0.5) for a in (sink, 2 * sink, 4 * sink)]


def sliding_windows(longest: int, given: int | None = None) -> list[Pattern]:
    """Windows without sinks, the same at every length, as a standard config's `sliding_window`
    says them: the model's own where its sliding layers have one, else N/8, N/4 and N/2 of the
    longest profiled length N."""
    if given is not None:
        return [Pattern(0, given, 0.0)] if given < longest else []
    return [Pattern(0, max(1, longest // d), 0.0) for d in (8, 4, 2)]


def head_losses(graph: TransformerGraph, signals) -> tuple[list[Pattern], np.ndarray]:
    """The grid and its loss per [layer, kv_head, pattern] (mean over the profiled lengths)."""
    influence = signals.attention
    if influence is None:
        return [], np.zeros((graph.num_layers, graph.blocks[0].attn.num_kv_heads, 0))
    # a pattern that keeps everything at the longest profiled length is dense, not an option
    usable = [k for k, p in enumerate(influence.grid) if not p.is_dense_at(max(influence.lengths))]
    loss = np.mean([influence.loss[n] for n in influence.lengths], axis=0)
    return [influence.grid[k] for k in usable], loss[:, :, usable]


def _layer_options(losses: np.ndarray, grid: list[Pattern]) -> list[tuple[tuple, float]]:
    """(per-head pattern indices, -1 = dense; summed loss) for one layer, at most two patterns."""
    heads = losses.shape[0]
    with_dense = np.concatenate([np.zeros((heads, 1)), losses], 1)  # column 0: dense
    seen, out = set(), []

    def add(assign):
        key = tuple(assign)
        if key not in seen and any(a >= 0 for a in key):
            seen.add(key)
            out.append((key, float(sum(with_dense[h, a + 1] for h, a in enumerate(key)))))

    for b in range(len(grid)):
        add([b] * heads)
    for a, b in itertools.combinations(range(-1, len(grid)), 2):
        gain = with_dense[:, b + 1] - with_dense[:, a + 1]  # what moving a head from a to b costs
        order = np.argsort(gain, kind="stable")
        for r in range(1, heads):
            moved = set(order[:r].tolist())
            add([b if h in moved else a for h in range(heads)])
    return out


def _spans(layer: int, patterns: list[Pattern | None]) -> Option:
    label = f"layer {layer}: " + ", ".join(f"kv{h} {'dense' if p is None else p}"
                                           for h, p in enumerate(patterns))
    return Option(AttnPattern.name, layer, {"spans": [None if p is None else p.to_json() for p in patterns]},
                  (f"attn:{layer}",), label=label)



class AttnPattern(Pass):
    name = "attn_pattern"
    measured = False  # option losses come from the per-head profile, not one run per option

    def candidates(self, graph: TransformerGraph, signals) -> list[Option]:
        grid, losses = head_losses(graph, signals)
        out = []
        for b in graph.blocks:
            if not np.isfinite(losses[b.index]).all():
                continue  # the profile found this layer's attention does not run patterns
            for assign, loss in _layer_options(losses[b.index], grid):
                option = _spans(b.index, [None if a < 0 else grid[a] for a in assign])
                option.loss = loss
                out.append(option)
        return out

    def from_plan(self, graph: TransformerGraph, layer: int, choice: dict) -> Option:
        exact_keys(choice, {"spans"})
        spans, heads = choice["spans"], graph.blocks[layer].attn.num_kv_heads
        if not isinstance(spans, list) or len(spans) != heads:
            raise ValueError(f"spans must list one pattern (or null: dense) per KV head ({heads})")
        patterns = [None if s is None else Pattern.checked(s) for s in spans]
        if all(p is None for p in patterns):
            raise ValueError("every head is dense: the choice changes nothing")
        return _spans(layer, patterns)

    def reshape(self, option: Option, shape: LayerShape) -> None:
        shape.kv_patterns = tuple(Pattern.from_json(s) for s in option.choice["spans"])

    def check(self, backend: Backend, option: Option) -> None:
        if not backend.runs_patterns(option.layer):
            raise ValueError(f"this layer's attention cannot run per-head patterns on {backend.format} "
                             f"(it needs transformers' attention interface, or decomposed ONNX attention)")
        if backend.graph_kv_cache and any(s is not None and s[2] > 0 for s in option.choice["spans"]):
            raise ValueError("a window growing with the length (beta > 0) on a graph with its own KV cache: "
                             "runtimes decoding from that cache would compute another model than the "
                             "plan measured; fixed windows only (beta 0)")

    def apply(self, backend: Backend, options: list[Option], signals) -> None:
        for o in options:
            backend.set_patterns(o.layer, [Pattern.from_json(s) for s in o.choice["spans"]])
