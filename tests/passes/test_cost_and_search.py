"""The cost model's budget semantics and the MILP search on synthetic options."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tailor.core.errors import TailorError
from tailor.core.targets import get_target
from tailor.passes.base import Option
from tailor.passes.cost import CostModel, Structure, Workload
from tailor.passes.search import price, search, solve, structure_of
from tailor.rewriter.capture import capture


@pytest.fixture(scope="module")
def llama_graph(tiny_models):
    return capture(tiny_models["llama"]).graph


def test_dense_ratio_is_one_and_skips_are_exact(llama_graph):
    cm = CostModel(llama_graph, Workload(1, 256, 16), get_target("h100"))
    dense = Structure.dense(llama_graph)
    assert cm.ratios(dense) == {"latency": 1.0, "flops": 1.0, "kv_memory": 1.0, "attention": 1.0}
    skip = dense.copy()
    skip.layers[1].kept = False
    total, layer = cm.total(dense), cm.layer(1, dense.layers[1])
    assert cm.total(skip).flops == pytest.approx(total.flops - layer.flops)
    assert cm.ratio(skip, "kv_memory") == pytest.approx(2 / 3)


def test_a_served_causal_lm_prices_its_head_at_the_last_position(tiny_models, tiny_onnx, llama_graph):
    """A torch causal LM is served keeping each prompt's last logits only (logits_to_keep=1): its
    workload says so, the head's prefill FLOPs are one position's per sequence, and the fit and
    the final check time it so; an ONNX export computes every position's logits and is priced so."""
    from tailor.rewriter.capture import capture_onnx
    from tailor.stages.cost import time_on_workload
    from tailor.stages.shapes import shapes_for

    kw = dict(batch=None, prompt_len=64, gen_len=0, calib_len=None, attn_lengths=None, validation_len=None)
    assert shapes_for(capture(tiny_models["llama"]), **kw).workload.last_logits
    assert not shapes_for(capture_onnx(tiny_onnx["llama"]), **kw).workload.last_logits
    target, dense = get_target("h100"), Structure.dense(llama_graph)
    every = CostModel(llama_graph, Workload(2, 64, 0), target).head(dense.head)
    last = CostModel(llama_graph, Workload(2, 64, 0, last_logits=True), target).head(dense.head)
    assert last.flops == pytest.approx(every.flops / 64) and last.flops > 0
    seen = []

    def model(ids, positions=None):
        seen.append(positions)
        return ids.float()

    time_on_workload({"m": model}, llama_graph, Workload(1, 16, 0, last_logits=True), repeats=1)
    assert seen and all(p is not None and p.tolist() == [15] for p in seen)


def test_patterns_shrink_kv_memory_unless_the_graph_keeps_its_own_cache(llama_graph):
    """A runtime keeping each head's pattern (tailor's) holds sink + window; a graph's own cache
    I/O (an ONNX decoder's present outputs) keeps every key whatever the pattern."""
    from tailor.core.patterns import Pattern

    workload, target = Workload(1, 1024, 64), get_target("h100")
    narrow = Structure.dense(llama_graph)
    for s in narrow.layers:
        s.kv_patterns = (Pattern(4, 16.0, 0.0),) * s.kv_groups
    assert CostModel(llama_graph, workload, target).ratio(narrow, "kv_memory") < 0.05
    assert CostModel(llama_graph, workload, target, graph_kv_cache=True).ratio(narrow, "kv_memory") == 1.0


def test_heads_split_into_two_groups_pay_for_their_copies(tiny_onnx, monkeypatch):
    """On ONNX a layer whose heads run two patterns (or dense and one) gathers q, k and v per
    group and puts the outputs back in order: priced on top of what its heads cost, at the
    block-sparse core's fitted rate for copies of rows; a layer on one pattern pays nothing."""
    from tailor.core.patterns import Pattern
    from tailor.passes import cost
    from tailor.rewriter.capture import capture_onnx

    graph = capture_onnx(tiny_onnx["llama"]).graph
    cm = CostModel(graph, Workload(1, 256, 0), get_target("h100"))
    cm.scales["sparse_rows"] = 3.0
    narrow, wide = Pattern(4, 16.0, 0.0), Pattern(4, 64.0, 0.0)
    a = graph.blocks[0].attn
    q_per = a.num_heads // a.num_kv_heads
    mixed, uniform = [narrow] + [wide] * (a.num_kv_heads - 1), [narrow] * a.num_kv_heads
    priced = {name: cm.attention_core(a, q_per, p, True).latency
              for name, p in (("mixed", mixed), ("uniform", uniform), ("dense and one", [None] + mixed[1:]))}
    monkeypatch.setattr(cost, "GROUP_SPLIT_PASSES", 0)
    unsplit = {name: cm.attention_core(a, q_per, p, True).latency
               for name, p in (("mixed", mixed), ("uniform", uniform), ("dense and one", [None] + mixed[1:]))}
    monkeypatch.undo()
    split = 3.0 * cm._group_split(a, a.num_heads).latency
    assert split > 0
    assert priced["mixed"] == pytest.approx(unsplit["mixed"] + split)
    assert priced["dense and one"] == pytest.approx(unsplit["dense and one"] + split)
    assert priced["uniform"] == unsplit["uniform"]


def test_kv_memory_follows_kv_heads(llama_graph):
    cm = CostModel(llama_graph, Workload(2, 128, 64), get_target("a100"))
    half = Structure.dense(llama_graph)
    for s in half.layers:
        s.kv_groups = 1  # of 2
    assert cm.ratio(half, "kv_memory") == pytest.approx(0.5)
    assert cm.ratio(half, "latency") < 1.0


def test_decomposed_attention_prices_its_scores_and_gains_nothing_from_patterns(llama_graph):
    """MatMul/mask/Softmax/MatMul attention (ONNX exports) computes and passes over every score:
    causal halving and sparse patterns (masks there) save nothing; fewer heads save scores."""
    from tailor.core.patterns import Pattern

    blocks = [replace(b, attn=replace(b.attn, kind="decomposed")) for b in llama_graph.blocks]
    decomposed = replace(llama_graph, blocks=blocks)
    workload, cpu = Workload(1, 512, 0), get_target("cpu")
    fused, unfused = CostModel(llama_graph, workload, cpu), CostModel(decomposed, workload, cpu)
    a_fused, a_unfused = llama_graph.blocks[0].attn, blocks[0].attn
    dense = [None, None]
    sparse = [Pattern(16, 16, 0.0)] * 2
    assert unfused.attention_core(a_unfused, 2, dense, True).attn_flops == pytest.approx(
        2 * fused.attention_core(a_fused, 2, dense, True).attn_flops, rel=0.01)  # n keys, not (n + 1) / 2
    assert unfused.attention_core(a_unfused, 2, sparse, True).latency == \
        unfused.attention_core(a_unfused, 2, dense, True).latency
    # fused SDPA skips the keys a pattern drops where tailor's block-sparse kernels run (GPUs);
    # on the CPU the patterns run as masked SDPA (tests/passes/test_attn_pattern.py)
    gpu = CostModel(llama_graph, workload, get_target("h100"))
    assert gpu.attention_core(a_fused, 2, sparse, True).attn_flops < \
        gpu.attention_core(a_fused, 2, dense, True).attn_flops
    # the passes over the scores: latency beyond the products', halved with half the query heads
    extra = [unfused.attention_core(a_unfused, q, dense, True).latency
             - unfused._roofline(unfused.attention_core(a_unfused, q, dense, True).attn_flops, 0).latency
             for q in (2, 1)]
    assert extra[0] > 0 and extra[1] == pytest.approx(extra[0] / 2, rel=0.05)


def test_elementwise_passes_shrink_with_the_branches(llama_graph):
    cm = CostModel(llama_graph, Workload(1, 256, 0), get_target("cpu"))
    shape = Structure.dense(llama_graph).layers[0]
    full = cm.elementwise(0, shape).bytes
    assert full > 0
    narrower = replace(shape, ffn_width=llama_graph.blocks[0].ffn.width // 2)
    no_ffn = replace(shape, ffn=False)
    assert cm.elementwise(0, no_ffn).bytes < cm.elementwise(0, narrower).bytes < full
    assert cm.elementwise(0, replace(shape, kept=False)).bytes == 0


def test_fit_to_measured_recovers_the_scales_the_ratios_were_timed_at(tiny_onnx):
    """Ratios made by a model with known scales: the fit on the compile's variants gets them back,
    and prices a structure it was not fitted on as that model does."""
    from tailor.stages.cost import fit_variants

    graph = capture(tiny_onnx["llama"]).graph
    workload = Workload(1, 256, 0)
    variants = {n: structure_of(graph, o) for n, o in fit_variants(graph, workload).items()}
    assert sorted(variants) == ["ffn_half", "heads_half", "patterns_narrowest", "patterns_wide"]
    truth = CostModel(graph, workload, get_target("cpu"))
    truth.scales |= {"branch_passes": 6.0, "attention_core": 1.7, "sparse_keys": 2.0, "sparse_rows": 4.5}
    fitted = CostModel(graph, workload, get_target("cpu"))
    scales = fitted.fit_to_measured({n: (s, truth.ratio(s, "latency")) for n, s in variants.items()})
    assert scales == pytest.approx(truth.scales, rel=1e-6)
    skipped = Structure.dense(graph)
    skipped.layers[1].kept = False
    assert fitted.ratio(skipped, "latency") == pytest.approx(truth.ratio(skipped, "latency"))
    assert fitted.to_json()["measured_ratios"]["ffn_half"] == pytest.approx(truth.ratio(variants["ffn_half"],
                                                                                         "latency"))
    # parts that ran faster than modelled: no scale goes below 1 (a roofline is a floor)
    truth.scales = dict.fromkeys(truth.scales, 0.5)
    scales = fitted.fit_to_measured({n: (s, truth.ratio(s, "latency")) for n, s in variants.items()})
    assert min(scales.values()) == pytest.approx(1.0) and all(k >= 1.0 for k in scales.values())


def test_fit_on_a_torch_graph_leaves_the_block_sparse_parts(llama_graph):
    """A torch model's patterns are masks, not block-sparse ops: the fit recovers the branch
    passes and the attention core from its two variants and leaves the sparse parts at 1."""
    from tailor.stages.cost import fit_variants

    workload = Workload(1, 256, 0)
    variants = {n: structure_of(llama_graph, o) for n, o in fit_variants(llama_graph, workload).items()}
    assert sorted(variants) == ["ffn_half", "heads_half"]
    truth = CostModel(llama_graph, workload, get_target("cpu"))
    truth.scales |= {"branch_passes": 5.0, "attention_core": 2.5}
    cm = CostModel(llama_graph, workload, get_target("cpu"))
    scales = cm.fit_to_measured({n: (s, truth.ratio(s, "latency")) for n, s in variants.items()})
    assert scales == pytest.approx(truth.scales, rel=1e-6)
    assert scales["sparse_keys"] == scales["sparse_rows"] == 1.0


def test_unknown_target():
    with pytest.raises(TailorError, match="unknown target"):
        get_target("tpu")


def _opt(layer, claims, cost, loss, name="x"):
    return Option(name, layer, {"i": layer}, claims, {"latency": cost, "flops": cost, "kv_memory": 0.0},
                  loss, f"{name}{layer}")


def test_solve_respects_exclusive_claims():
    opts = [_opt(0, ("attn:0", "ffn:0"), -0.5, 1.0, "skip"), _opt(0, ("ffn:0",), -0.3, 0.2, "ffn"),
            _opt(1, ("attn:1",), -0.2, 0.1, "head"), _opt(1, ("attn:1",), -0.35, 0.4, "head")]
    chosen = solve(opts, np.array([o.loss for o in opts]), "latency", -0.5, 1.0)
    claims = [c for o in chosen for c in o.claims]
    assert len(claims) == len(set(claims))
    assert sum(o.cost["latency"] for o in chosen) <= -0.5 + 1e-9
    # the cheapest way to save half: ffn0 + head1 (0.3), not skip0 (1.0)
    assert sorted(o.label for o in chosen) == ["ffn0", "head1"]


def test_solve_drops_dominated_options_without_changing_the_optimum():
    """Options beaten within their claim group (saving no more at no lower loss) are left out
    before HiGHS runs; the optimum is an exhaustive search's over every option."""
    import itertools

    from tailor.passes.search import undominated

    rng = np.random.default_rng(3)
    claims = [("attn:0",), ("ffn:0",), ("attn:0", "ffn:0"), ("attn:1",), ("ffn:1",)]
    opts = [_opt(j, claims[j % len(claims)], -float(rng.uniform(0.02, 0.3)), float(rng.uniform(0, 1)))
            for j in range(14)]
    losses = np.array([o.loss for o in opts])
    cost = np.array([o.cost["latency"] for o in opts])
    kept = undominated(opts, cost, losses)
    assert 0 < len(kept) < len(opts)
    for j in set(range(len(opts))) - set(kept):  # each dropped one has a better in its group
        assert any(set(opts[k].claims) == set(opts[j].claims) and cost[k] <= cost[j]
                   and losses[k] <= losses[j] for k in kept)
    best = min((sum(losses[list(c)]) for n in range(len(opts) + 1)
                for c in itertools.combinations(range(len(opts)), n)
                if cost[list(c)].sum() <= -0.4 and len({x for j in c for x in opts[j].claims})
                == sum(len(opts[j].claims) for j in c)), default=None)
    chosen = solve(opts, losses, "latency", -0.4, 1.0)
    assert sum(o.loss for o in chosen) == pytest.approx(best)


def test_a_rival_plan_measured_better_wins(llama_graph):
    """A named whole plan within budget is measured beside the solver's and taken where the
    measurement says it is closer to dense; one measured worse is not."""
    from tailor.passes.profile import neutral_signals
    from tailor.passes.registry import candidates_for

    cm = CostModel(llama_graph, Workload(1, 512, 0), get_target("h100"))
    opts = candidates_for(llama_graph, neutral_signals(llama_graph), ["layer_skip", "ffn_prune"])
    price(opts, cm)
    for o in opts:  # estimated: skipping layer 0 hurts most
        o.loss = 1.0 if o.pass_name == "layer_skip" and o.layer == 0 else 0.01
    skip_first = [o for o in opts if o.pass_name == "layer_skip" and o.layer == 0]
    solver = search(opts, cm, 0.8, "latency", measure=None).chosen
    assert [o.key for o in solver] != [o.key for o in skip_first]
    for rival_kl, wins in ((0.001, True), (10.0, False)):
        measure = lambda chosen: rival_kl if chosen == skip_first else sum(o.loss for o in chosen)  # noqa: E731
        result = search(opts, cm, 0.8, "latency", measure, rivals={"skip first": skip_first})
        assert (result.chosen == skip_first) is wins
        assert [h["iteration"] for h in result.iterations].count("skip first") == 1


def test_search_budget_met_unreachable_and_deterministic(llama_graph):
    from tailor.passes.profile import neutral_signals
    from tailor.passes.registry import candidates_for

    cm = CostModel(llama_graph, Workload(1, 512, 0), get_target("h100"))
    passes = ["layer_skip", "ffn_prune", "head_prune"]
    opts = candidates_for(llama_graph, neutral_signals(llama_graph), passes)
    price(opts, cm)
    rng = np.random.default_rng(0)
    for o in opts:
        o.loss = float(rng.random())
    a = search(opts, cm, 0.6, "latency", measure=None)
    b = search(opts, cm, 0.6, "latency", measure=None)
    assert [o.key for o in a.chosen] == [o.key for o in b.chosen]
    assert cm.ratio(structure_of(llama_graph, a.chosen), "latency") <= 0.6 + 1e-9
    with pytest.raises(TailorError, match=r"smallest reachable budget is 0\.\d+"):
        search(opts, cm, 0.01, "latency", measure=None)


def test_refine_corrects_an_option_estimated_free(llama_graph):
    """An option whose estimated loss is 0 but which really hurts: scaling the chosen options'
    losses by measured / predicted could never correct it (0 × any factor), so every refined plan
    kept it. The loss the estimates missed is shared out over the chosen options, the one
    estimated free included, and the next plan leaves it."""
    from tailor.passes.profile import neutral_signals
    from tailor.passes.registry import candidates_for

    cm = CostModel(llama_graph, Workload(1, 512, 0), get_target("h100"))
    opts = candidates_for(llama_graph, neutral_signals(llama_graph),
                          ["layer_skip", "ffn_prune", "head_prune"])
    price(opts, cm)
    dense = cm.total(Structure.dense(llama_graph)).latency
    true = {}
    for o in opts:  # estimates right for all but one: KL per unit of saving, layer skips dear
        o.loss = {"layer_skip": 10.0, "ffn_prune": 3.0, "head_prune": 2.0}[o.pass_name] * \
            (1.0 if o.pass_name == "layer_skip" else -o.cost["latency"] / dense)
        true[o.key] = o.loss
    trap = next(o for o in opts if o.label == "layer 2: drop attention")
    trap.loss, true[trap.key] = 0.0, 5.0  # "free" alone, costly in truth
    measured = []

    def measure(chosen):
        measured.append([o.key for o in chosen])
        return sum(true[o.key] for o in chosen)

    result = search(opts, cm, 0.7, "latency", measure)
    assert trap.key in measured[0]                      # the estimates pick it first
    assert trap.key not in measured[1]                  # one correction and the search moves away
    assert trap.key not in [o.key for o in result.chosen]
    assert result.measured_kl == pytest.approx(sum(true[o.key] for o in result.chosen))
    assert result.measured_kl < 1.0                     # before: 5.33, every plan kept the trap
    assert cm.ratio(structure_of(llama_graph, result.chosen), "latency") <= 0.7 + 1e-9
    assert [o.key for o in search(opts, cm, 0.7, "latency", measure).chosen] == \
        [o.key for o in result.chosen]                  # deterministic


def test_search_measures_the_estimated_options_its_plans_choose(llama_graph):
    """Options estimated from a proxy (their measurement left out for time) are measured once a
    plan chooses them, and the plan is solved again on the measured loss before it is measured
    whole: an option the proxy thought cheap but which hurts is left out."""
    from tailor.passes.profile import neutral_signals
    from tailor.passes.registry import candidates_for

    cm = CostModel(llama_graph, Workload(1, 512, 0), get_target("h100"))
    opts = candidates_for(llama_graph, neutral_signals(llama_graph), ["layer_skip", "ffn_prune"])
    price(opts, cm)
    dense = cm.total(Structure.dense(llama_graph)).latency
    true = {o.key: (4.0 if o.pass_name == "layer_skip" else 3.0) * -o.cost["latency"] / dense for o in opts}
    for o in opts:
        o.loss = true[o.key]
    cheap = [o for o in opts if o.pass_name == "layer_skip"]
    for o in cheap:  # the proxy's estimate: a tenth of the truth
        o.loss = true[o.key] / 10
    asked = []

    def refine(chosen):
        fresh = {o.key: true[o.key] for o in chosen if o in cheap and o.key not in asked}
        asked.extend(fresh)
        return fresh

    plans = []
    result = search(opts, cm, 0.7, "latency", lambda c: plans.append(c) or sum(true[o.key] for o in c),
                    refine=refine)
    assert asked and len(asked) == len(set(asked))           # each estimated option measured once
    assert all(o.loss == true[o.key] for o in result.chosen)  # every chosen loss is measured
    assert result.measured_kl == pytest.approx(sum(true[o.key] for o in result.chosen))
    assert result.predicted_kl == pytest.approx(result.measured_kl)
    assert cm.ratio(structure_of(llama_graph, result.chosen), "latency") <= 0.7 + 1e-9


def test_max_checks_bounds_the_plans_measured(llama_graph):
    from tailor.passes.profile import neutral_signals
    from tailor.passes.registry import candidates_for

    cm = CostModel(llama_graph, Workload(1, 512, 0), get_target("h100"))
    opts = candidates_for(llama_graph, neutral_signals(llama_graph),
                          ["layer_skip", "ffn_prune", "head_prune"])
    price(opts, cm)
    for o in opts:
        o.loss = 0.01
    measured = []
    # every plan measures 10× its estimate: without a bound the search re-solves up to 8 times and
    # then measures each pass's own plan
    result = search(opts, cm, 0.6, "latency", lambda c: measured.append(c) or 0.1 * len(c), max_checks=2)
    assert len(measured) == 2 and result.measured_kl is not None
    assert len(search(opts, cm, 0.6, "latency", lambda c: measured.append(c) or 0.1 * len(c))
               .iterations) > 2
