"""Published single-technique methods, written as lists of tailor options cut down to a budget,
so that they run through the same rewrite code as tailor's own plans (registry.apply_options)
and are priced by the same cost model. Each builder returns the options, or None where the
method cannot reach the budget under `objective`.

- StreamingLLM (Xiao et al. 2023): every KV head on one sink + static window;
- DuoAttention (Xiao et al. 2024): retrieval heads dense, the others on a streaming pattern; heads
  ranked by DuoAttention's gates fitted on synthetic retrieval data where the profile has them
  (tailor.backends.retrieval_gates), else by the attention profile's measured loss on the pattern;
- ShortGPT (Men et al. 2024): layers of lowest block influence removed;
- SLEB (Song et al. 2024): blocks removed one at a time, each time the one whose removal raises
  calibration perplexity least;
- FLAP, uniform (An et al. 2024): the same fraction of query heads (GQA-regular) and of FFN
  channels in every layer, with tailor's least-squares compensation;
- KVSharer (Yang et al. 2024): layers read an earlier layer's KV cache, pairs taken in order of
  key dissimilarity (most dissimilar first, KVSharer's counter-intuitive finding), without its
  per-pair verification.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tailor.backends.base import Backend
from tailor.core.patterns import Pattern
from tailor.passes.attn_pattern import head_losses
from tailor.passes.base import Option
from tailor.passes.cost import CostModel
from tailor.passes.ffn_prune import KEEP
from tailor.passes.registry import PASSES, apply_options
from tailor.passes.search import price, structure_of

# StreamingLLM's attention sinks: the first four tokens
STREAMING_SINK = 4
# slack on a budget comparison: the cost model's sums in floating point
SLACK = 1e-9


def within(cost_model: CostModel, options: list[Option], budget: float, objective: str) -> bool:
    return cost_model.ratio(structure_of(cost_model.graph, options), objective) <= budget + SLACK


def greedy(options: list[Option], key: Callable[[Option], float], cost_model: CostModel, budget: float,
           objective: str) -> list[Option] | None:
    """Options taken in `key` order, skipping any that claims a part already changed, until the
    budget is met."""
    chosen: list[Option] = []
    claimed: set[str] = set()
    for o in sorted(options, key=key):
        if within(cost_model, chosen, budget, objective):
            break
        if claimed.isdisjoint(o.claims):
            chosen.append(o)
            claimed.update(o.claims)
    return chosen if within(cost_model, chosen, budget, objective) else None


def every_head_on(pattern: Pattern, graph) -> list[Option]:
    """attn_pattern's options putting every KV head of every layer on `pattern`."""
    spans = lambda b: [pattern.to_json()] * b.attn.num_kv_heads  # noqa: E731
    return [PASSES["attn_pattern"].from_plan(graph, b.index, {"spans": spans(b)}) for b in graph.blocks]


def streaming_llm(cost_model: CostModel, budget: float, objective: str,
                  sink: int = STREAMING_SINK) -> list[Option] | None:
    """Every KV head on `sink` sink tokens + the widest static window that meets the budget."""
    graph, longest = cost_model.graph, cost_model.workload.prompt_len + cost_model.workload.gen_len

    return _widest(lambda window: every_head_on(Pattern(sink, window, 0.0), graph), longest - sink - 1,
                   cost_model, budget, objective)


def _widest(plan: Callable[[int], list[Option]], widest: int, cost_model: CostModel, budget: float,
            objective: str) -> list[Option] | None:
    """`plan(window)` for the widest window in [1, widest] that meets the budget; None where even
    a window of 1 does not."""
    if not within(cost_model, plan(1), budget, objective):
        return None
    low, high = 1, max(1, widest)
    while low < high:  # the cost grows with the window: bisect for the widest within budget
        mid = (low + high + 1) // 2
        low, high = (mid, high) if within(cost_model, plan(mid), budget, objective) else (low, mid - 1)
    return plan(low)


def duo_attention(cost_model: CostModel, signals, budget: float, objective: str,
                  by_gates: bool = True) -> list[Option] | None:
    """KV heads moved to a streaming pattern until the budget is met; the others stay dense. Where
    the profile fitted retrieval gates (tailor.backends.retrieval_gates: DuoAttention's own
    method) and `by_gates`, in order of the gate, lowest first, on the pattern they were fitted
    with; else in order of the profile's measured loss on a pattern (the least hurt first), the
    widest static (sink + window) one of the profile's grid with which the budget can be reached."""
    graph, influence = cost_model.graph, signals.attention
    if by_gates and influence is not None and influence.gates is not None:
        options = _stream_in_order(cost_model, _by_gate(influence.gates), influence.gate_pattern, budget,
                                   objective)
        if options is not None:
            return options
    grid, loss = head_losses(graph, signals)
    static = sorted((k for k, p in enumerate(grid) if p.beta == 0),
                    key=lambda k: -(grid[k].sink + grid[k].alpha))
    for k in static:
        if not within(cost_model, every_head_on(grid[k], graph), budget, objective):
            continue
        kv_heads = graph.blocks[0].attn.num_kv_heads
        order = sorted(((float(loss[i, h, k]), i, h) for i in range(graph.num_layers) for h in range(kv_heads)
                        if np.isfinite(loss[i, h, k])))
        options = _stream_in_order(cost_model, [(i, h) for _, i, h in order], grid[k], budget, objective)
        if options is not None:
            return options
    return None


def duo_attention_wide(cost_model: CostModel, signals, budget: float, objective: str,
                       share: float) -> list[Option] | None:
    """DuoAttention's ranking with StreamingLLM's window: the `share` of KV heads the retrieval
    gates rank highest dense, every other on the gates' sinks + the widest static window that meets
    the budget. DuoAttention's short streaming window loses what many heads carry together where
    half the cache must go: SmolLM2-135M at kv_memory 0.5 and 8K tokens answered 0.62 / 0.10 of
    4K / 8K passkeys with 48% of its heads dense and the rest on 64 + 256 tokens, 0.84 / 0.40 with
    20% dense and the rest on 64 + 3,008 (dense 0.82 / 0.34; benchmarks/retrieval_gates.py). None without
    gates, or where no window meets the budget."""
    influence = signals.attention
    if influence is None or influence.gates is None:
        return None
    graph = cost_model.graph
    kv_heads = graph.blocks[0].attn.num_kv_heads
    order = _by_gate(influence.gates)
    streamed = order[:len(order) - round(share * len(order))]
    sink = influence.gate_pattern.sink
    longest = cost_model.workload.prompt_len + cost_model.workload.gen_len

    def plan(window: int) -> list[Option]:
        spans, pattern = {i: [None] * kv_heads for i, _ in streamed}, Pattern(sink, window, 0.0).to_json()
        for i, h in streamed:
            spans[i][h] = pattern
        return [PASSES["attn_pattern"].from_plan(graph, i, {"spans": spans[i]}) for i in sorted(spans)]

    return _widest(plan, longest - sink - 1, cost_model, budget, objective) if streamed else None


def _by_gate(gates: np.ndarray) -> list[tuple[int, int]]:
    """The (layer, KV head)s with a gate, lowest gate (the first to stream) first."""
    ranked = sorted((float(gates[i, h]), int(i), int(h)) for i, h in zip(*np.nonzero(np.isfinite(gates))))
    return [(i, h) for _, i, h in ranked]


def _stream_in_order(cost_model: CostModel, heads: list[tuple[int, int]], pattern: Pattern, budget: float,
                     objective: str) -> list[Option] | None:
    """attn_pattern's options putting the (layer, KV head)s on `pattern` in order, as few as meet
    the budget; None where all of them do not."""
    graph = cost_model.graph
    kv_heads = graph.blocks[0].attn.num_kv_heads
    streaming: dict[int, set[int]] = {}
    by_layer: dict[int, Option] = {}  # only the layer a head joins is built again
    for i, h in heads:
        chosen = streaming.setdefault(i, set())
        chosen.add(h)
        by_layer[i] = PASSES["attn_pattern"].from_plan(
            graph, i, {"spans": [pattern.to_json() if k in chosen else None for k in range(kv_heads)]})
        options = [by_layer[layer] for layer in sorted(by_layer)]
        if within(cost_model, options, budget, objective):
            return options
    return None


def shortgpt(cost_model: CostModel, signals, budget: float, objective: str) -> list[Option] | None:
    """Layers removed in order of block influence (1 - cos(block input, output)), lowest first."""
    skips = PASSES["layer_skip"].candidates(cost_model.graph, signals)
    return greedy(skips, lambda o: signals.block_influence[o.layer], cost_model, budget, objective)


def sleb(cost_model: CostModel, budget: float, objective: str,
         perplexity: Callable[[list[Option]], float]) -> list[Option] | None:
    """Blocks removed one at a time, each time the one whose removal (beside those removed
    already) gives the lowest `perplexity`, until the budget is met."""
    left = PASSES["layer_skip"].candidates(cost_model.graph, None)
    if not within(cost_model, left, budget, objective):
        return None  # not even without any block
    chosen: list[Option] = []
    while not within(cost_model, chosen, budget, objective):
        scores = [perplexity(chosen + [o]) for o in left]
        chosen.append(left.pop(int(np.argmin(scores))))
    return chosen


def _head_shapes(graph) -> list[tuple[int, int]]:
    """(KV groups, query heads per group) a layer can keep, most query heads first (then most KV
    groups): every head kept first, none last."""
    a = graph.blocks[0].attn
    q_per = a.num_heads // a.num_kv_heads
    shapes = [(g, m) for g in range(1, a.num_kv_heads + 1) for m in range(1, q_per + 1)] + [(0, 0)]
    return sorted(shapes, key=lambda s: (-s[0] * s[1], -s[0]))


def _uniform_heads(graph, options: list[Option], g: int, m: int) -> list[Option] | None:
    """head_prune's option keeping (g, m) in every layer ([] for every head kept; None where some
    layer has no such option)."""
    a = graph.blocks[0].attn
    if (g, m) == (a.num_kv_heads, a.num_heads // a.num_kv_heads):
        return []
    chosen = [o for o in options if o.pass_name == "head_prune" and len(o.choice["kv_heads"]) == g and
              (len(o.choice["queries"][0]) if o.choice["queries"] else 0) == m]
    return chosen if len(chosen) == graph.num_layers else None


def _uniform_ffn(graph, options: list[Option], keep: float) -> list[Option] | None:
    """ffn_prune's option keeping the fraction `keep` of the channels in every layer ([] for 1)."""
    if keep == 1.0:
        return []
    by_layer = {}
    for o in options:
        if o.pass_name == "ffn_prune" and abs(len(o.choice["channels"]) / graph.blocks[o.layer].ffn.width
                                             - keep) < 1 / 16:  # the KEEP step is 1/8
            by_layer[o.layer] = o
    return list(by_layer.values()) if len(by_layer) == graph.num_layers else None


def _candidates(cost_model: CostModel, signals, name: str) -> list[Option]:
    """A pass's candidates (ranked by the profile's signals), priced."""
    options = PASSES[name].candidates(cost_model.graph, signals)
    price(options, cost_model)
    return options


def uniform_heads(cost_model: CostModel, signals, budget: float, objective: str) -> list[Option] | None:
    """The same (KV groups, query heads per group) kept in every layer: the most heads that
    meet the budget (heads ranked by head_prune's OBS)."""
    graph = cost_model.graph
    options = _candidates(cost_model, signals, "head_prune")
    for g, m in _head_shapes(graph)[1:]:
        chosen = _uniform_heads(graph, options, g, m)
        if chosen is not None and within(cost_model, chosen, budget, objective):
            return chosen
    return None


def flap_uniform(cost_model: CostModel, signals, budget: float, objective: str) -> list[Option] | None:
    """The same share of query heads (GQA-regular) and of FFN channels kept in every layer:
    of the pairs (heads kept, FFN channels kept) that meet the budget, the one that costs most
    (prunes least), then the one whose two shares are closest (FLAP's uniform setting prunes
    both at one rate; GQA-regular head counts come in coarse steps). FFN channels only where
    they count for the objective: neither KV memory nor attention FLOPs depend on the FFN.
    Heads and channels ranked by head_prune's and ffn_prune's OBS."""
    graph = cost_model.graph
    options = _candidates(cost_model, signals, "head_prune") + _candidates(cost_model, signals, "ffn_prune")
    a = graph.blocks[0].attn
    ffn_counts = any(o.cost.get(objective, 0.0) < 0 for o in options if o.pass_name == "ffn_prune")
    best, best_key = None, None
    for g, m in _head_shapes(graph):
        heads = _uniform_heads(graph, options, g, m)
        for keep in (1.0, *KEEP) if ffn_counts else (1.0,):
            ffn = _uniform_ffn(graph, options, keep)
            if heads is None or ffn is None or not heads + ffn:
                continue
            chosen = heads + ffn
            ratio = cost_model.ratio(structure_of(graph, chosen), objective)
            key = (-ratio, abs(g * m / a.num_heads - keep))
            if ratio <= budget + SLACK and (best_key is None or key < best_key):
                best, best_key = chosen, key
    return best


def kv_sharer(cost_model: CostModel, signals, budget: float, objective: str) -> list[Option] | None:
    """Layer pairs (source i < j) in order of key dissimilarity, most dissimilar first, j then
    reading i's KV cache; a pair is skipped where it conflicts with one taken (tailor's kv_share
    lets a layer be the source of one other layer), until the budget is met."""
    graph = cost_model.graph
    sim = np.asarray(signals.kv_similarity)
    pairs = []
    for j in range(1, graph.num_layers):
        for i in range(j):
            try:
                pairs.append((float(sim[j, i]), PASSES["kv_share"].from_plan(graph, j, {"source": i})))
            except ValueError:  # these two layers cannot share (shapes, fused projections, q/k norms)
                continue
    similarity = {o.key: s for s, o in pairs}
    return greedy([o for _, o in pairs], lambda o: similarity[o.key], cost_model, budget, objective)


def calibration_perplexity(dense: Backend, signals, ids: torch.Tensor, batch: int = 4
                           ) -> Callable[[list[Option]], float]:
    """options -> perplexity on the windows `ids` [n, T] of the dense model with them applied (a
    clone each time). The blocks before the first layer the options change replay the dense
    model's recorded outputs instead of running (as option measurements do)."""
    record = dense.record_blocks(ids, batch)

    def perplexity(options: list[Option]) -> float:
        variant = apply_options(dense.clone(), options, signals)
        first = min((PASSES[o.pass_name].first_layer(o) for o in options), default=0)
        nll, count = 0.0, 0
        for logits, chunk in zip(variant.stream(ids, batch, replay=(record, first)),
                                 dense.input_batches(ids, batch)):
            logits = logits[:, :-1].float()
            target = chunk[:, 1:].to(logits.device)
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                                           reduction="sum"))
            count += target.numel()
        variant.close()
        return float(np.exp(nll / count))

    return perplexity
