"""Planning: the budgeted search over the profile's options (or a saved plan's options), measured
on held-out data, and the sequential refit of the plan's model."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from tailor.backends.base import Backend, compared_positions, divergence
from tailor.core.host_memory import release_free_memory
from tailor.data.calibration import Calibration
from tailor.data.retrieval import answer_logits, answered_sequences
from tailor.passes.base import Option
from tailor.passes.baselines import duo_attention, duo_attention_wide, streaming_llm
from tailor.passes.cost import Allowance, CostModel, forward_flops
from tailor.passes.profile import OptionMeter, input_lengths
from tailor.passes.refit import refit_sequentially
from tailor.passes.registry import apply_options
from tailor.passes.search import SearchResult, Uniform, price, search

# seconds of work (cost.MEASURE_RATE) for whole plans measured on the held-out data (at least
# MIN_PLAN_CHECKS, so that one correction of the estimates is measured) and for the options a
# plan chose whose loss was only estimated
PLAN_CHECK_SECONDS = 120
MIN_PLAN_CHECKS = 2
REFINE_SECONDS = 60
# shares of KV heads kept dense in the whole plans that rank heads by the retrieval gates and give
# the others the widest window the budget allows (baselines.duo_attention_wide); the check picks
WIDE_WINDOW_SHARES = (0.1, 0.2, 0.3)
# seconds of work (cost.MEASURE_RATE) the dense model may spend finding held-out retrieval
# sequences it answers, beyond the few a length it always runs: on a GPU enough for every form's
# quota at 8K tokens; on 2 CPU cores at 4K, the few (each candidate there is seconds of forward)
HELDOUT_RETRIEVAL_SECONDS = 30


class HeldOut:
    """What the search's refine loop measures a plan on: next-token KL on held-out calibration
    windows (and on windows of the validation length, not profiled, when attention is profiled)
    and, weighted, the KL at the answers of held-out retrieval sequences of that length. Each
    measurement's parts are kept in `measured` (the report's plans show them)."""

    def __init__(self, dense: Backend, cal: Calibration, device_kind: str = "cpu"):
        self.cal, self.graph, self.is_lm = cal, dense.graph, dense.graph.task == "causal-lm"
        self.texts = [t for t in (cal.heldout_ids, cal.heldout_long_ids) if t is not None]
        self.positions = [compared_positions(dense.graph, t) for t in self.texts]
        # on the host: read a few dozen times in a search, and 14K validation tokens of a 49K
        # vocabulary's logits took 3 GiB of a GPU. As the head's inputs where the model's head
        # splits off: SmolLM2's references at the compared positions were 2 × 0.5 GB of logits
        self.reference = [[o.to("cpu") for o in dense.stream(t, positions=p, head_inputs=True)]
                          for t, p in zip(self.texts, self.positions)]
        # where the dense model fails, a plan's distance from its answer is noise, not retrieval lost
        lengths = sorted({len(s.ids) for s in cal.heldout_retrieval})
        share = Allowance(HELDOUT_RETRIEVAL_SECONDS, device_kind).total / max(1, len(lengths))
        runs = {n: max(cal.heldout_retrieval_runs, int(share / forward_flops(self.graph, n)))
                for n in lengths}
        self.retrieval, self.ret_reference = answered_sequences(dense.runnable(), cal.heldout_retrieval,
                                                                cal.heldout_retrieval_per_length, runs,
                                                                split=dense.input_batches)
        self.by_form: dict[str, list[int]] = {}  # the retrieval sequences of each form
        for i, s in enumerate(self.retrieval):
            self.by_form.setdefault(s.form, []).append(i)
        self.measured: list[dict[str, Any]] = []

    def work(self) -> float:
        """FLOPs of measuring one plan (its forwards of the dense model's size)."""
        texts = sum(forward_flops(self.graph, n, head_tokens=None if p is None else len(p))
                    for t, p in zip(self.texts, self.positions) for n in input_lengths(t))
        answers = sum(forward_flops(self.graph, len(s.ids), head_tokens=len(s.ids) - s.answer_start + 1)
                      for s in self.retrieval)
        return float(texts + answers)

    def divergence(self, backend: Backend) -> float:
        """Text KL (the mean over the calibration length and the validation length) and the
        retrieval answers' KL, weighted: that of the form a plan keeps worst. The forms stand for
        different retrieval tasks; averaged over the sequences, a plan could trade one of them
        whole for a little on the others."""
        texts = [divergence(ref, backend.stream(t, positions=p, head_inputs=True), self.is_lm)
                 for ref, t, p in zip(self.reference, self.texts, self.positions)]
        kl = float(np.mean(texts))
        parts: dict[str, Any] = {"text_kl": texts}
        if self.retrieval:
            answers = answer_logits(backend.runnable(), self.retrieval, split=backend.input_batches)
            forms = {form: divergence([self.ret_reference[i] for i in seqs], [answers[i] for i in seqs],
                                      self.is_lm) for form, seqs in self.by_form.items()}
            retrieval = max(forms.values())
            w = self.cal.retrieval_weight
            kl = (1 - w) * kl + w * retrieval
            parts |= {"retrieval_kl": retrieval, "retrieval_kl_by_form": forms,
                      "retrieval_answered": sum(s.answered_by(a[0]) for s, a in zip(self.retrieval, answers))}
        self.measured.append(parts)
        release_free_memory()
        return kl


def published_rivals(options: list[Option], cost_model: CostModel, signals, budget: float,
                     objective: str) -> dict[str, list[Option]]:
    """Whole plans of published attention methods, built from the same profile, that the search
    measures beside its own (where attention patterns are among the options): DuoAttention-style
    (whole KV heads dense, the rest streaming), StreamingLLM, and DuoAttention's ranking with a
    share of the heads dense and the others on the widest window. Each option
    carries the estimate and price of the same rewrite among `options`, else its own price."""
    if cost_model.graph.task != "causal-lm" or not any(o.pass_name == "attn_pattern" for o in options):
        return {}
    known = {o.key: o for o in options}
    # both head rankings compete: on SmolLM2-135M at attention 0.25 the profile's ranking kept the
    # 4K passkey (0.95 of 20 prompts) where the gates' lost it (0.30 of 50)
    plans = {"DuoAttention-style": duo_attention(cost_model, signals, budget, objective),
             "DuoAttention-style, heads by the profile's loss": duo_attention(cost_model, signals, budget,
                                                                              objective, by_gates=False),
             "StreamingLLM": streaming_llm(cost_model, budget, objective)}
    for share in WIDE_WINDOW_SHARES:
        plans[f"DuoAttention ranking, {share:.0%} dense, wide window"] = duo_attention_wide(
            cost_model, signals, budget, objective, share)
    rivals = {}
    for name, plan in plans.items():
        if plan:
            price(plan, cost_model)
            rivals[name] = [known.get(o.key, o) for o in plan]
    return rivals


def searched_plan(dense: Backend, options: list[Option], signals, cost_model: CostModel, budget: float,
                  objective: str, heldout: HeldOut, meter: OptionMeter | None = None,
                  estimated: set[str] = frozenset(), device_kind: str = "cpu",
                  uniform: tuple[Uniform, ...] = (),
                  allowed: Callable[[Option], bool] | None = None) -> tuple[SearchResult, Backend, float]:
    """The search's plan, its rewritten model and that model's held-out divergence (the best
    measured model is kept rather than rebuilt). Options whose key is in `estimated` are
    measured by `meter` once a plan chooses them, within REFINE_SECONDS of work (SearchResult.
    refined); whole plans within PLAN_CHECK_SECONDS. Every plan keeps each `uniform` value the
    same on all layers (tailor.passes.search.Uniform), and the published methods' plans measured
    beside the search's are only those whose every rewrite is `allowed` (a restricted search)."""
    best: dict[str, Any] = {}
    estimated = set(estimated)
    refine_allowance = Allowance(REFINE_SECONDS, device_kind)
    checks = max(MIN_PLAN_CHECKS, int(Allowance(PLAN_CHECK_SECONDS, device_kind).total / heldout.work()))

    def refine(chosen):
        todo = []
        for o in chosen:
            work = meter.work(o) if o.key in estimated else None
            if work is not None and refine_allowance.affords(work):
                refine_allowance.spend(work)
                todo.append(o)
        estimated.difference_update(o.key for o in todo)
        return meter(todo)

    def measure(chosen):
        variant = apply_options(dense.clone(), chosen, signals)
        kl = heldout.divergence(variant)
        if not best or kl < best["kl"]:
            if best:
                best["model"].close()
            best.update(kl=kl, keys=sorted(o.key for o in chosen), model=variant)
        else:
            variant.close()
        return kl

    first = len(heldout.measured)
    rivals = {name: plan for name, plan in
              published_rivals(options, cost_model, signals, budget, objective).items()
              if allowed is None or all(allowed(o) for o in plan)}
    result = search(options, cost_model, budget, objective, measure, max_checks=checks,
                    refine=refine if meter is not None and estimated else None, rivals=rivals,
                    uniform=uniform)
    for it, parts in zip(result.iterations, heldout.measured[first:]):  # one measurement each, in order
        it |= parts
    if best.get("keys") == sorted(o.key for o in result.chosen):
        return result, best["model"], best["kl"]
    if best:
        best["model"].close()
    variant = apply_options(dense.clone(), result.chosen, signals)
    return result, variant, (heldout.divergence(variant) if result.chosen else 0.0)


def refitted(dense: Backend, variant: Backend, kl: float, chosen: list[Option], cal: Calibration,
             heldout: HeldOut, progress: bool) -> tuple[Backend, dict[str, Any]]:
    """The plan's model refitted in sequence (tailor.passes.refit), kept where the held-out
    windows say it is closer to the original; the report says which, with both figures."""
    removed = {o.layer for o in chosen if o.pass_name == "layer_skip"}
    candidate = refit_sequentially(dense, variant.clone(), cal.profile_ids, removed=removed,
                                   progress=progress)
    after = heldout.divergence(candidate)
    kept = after < kl
    (variant if kept else candidate).close()
    return (candidate if kept else variant), {"measured_kl_heldout_before": kl,
                                              "measured_kl_heldout_after": after, "kept": kept,
                                              "measured_kl_heldout": min(kl, after)}
