"""tailor.compile() and tailor.load(): the pipeline of DESIGN.md, read top to bottom.

    capture → calibrate and profile → plan (search, or a saved plan) → rewrite → refit
            → validate → Compiled (.save writes the artifact; codegen happens there)

Replaying a saved plan differs from compiling in one step only: the options come from the plan
instead of the search.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailor.backends import backend_for
from tailor.backends.base import Backend
from tailor.backends.hf_checkpoint import HF_DIR, StandardArchitecture, StandardShape, architecture
from tailor.codegen.tvm.tune import check_trials
from tailor.core.dispatch import resolve_max_memory
from tailor.core.errors import TailorError
from tailor.core.plan import OBJECTIVES, WORKLOAD_KEYS, Plan, check_budget
from tailor.data.calibration import Calibration
from tailor.passes.attention_profile import AttentionInfluence
from tailor.passes.attn_pattern import default_grid, sliding_windows
from tailor.passes.base import Option
from tailor.passes.cost import CostModel
from tailor.passes.int8 import int8_refusal
from tailor.passes.profile import OptionMeter, Profile, neutral_signals, run_profile, store
from tailor.passes.registry import PASSES, apply_options, offered, options_from_plan
from tailor.passes.search import check_reachable, price, structure_of
from tailor.passes.standard import one_cache_shape, sayable, standard_shape, uniform, unsayable
from tailor.quality.metrics import evaluate_pair
from tailor.rewriter.capture import Captured, capture
from tailor.rewriter.onnx_kv_cache import has_cache
from tailor.stages.artifact import Compiled, describe, load, placement, resolve_formats
from tailor.stages.calibrate import attention_data, calibration, input_len, profile_report, tokenizer_path
from tailor.stages.cost import (
    MIN_PATTERN_HEADROOM,
    clean_ups,
    cost_model_for,
    measured_latency,
    pattern_headroom,
)
from tailor.stages.log import StageLog
from tailor.stages.search import HeldOut, refitted, searched_plan
from tailor.stages.shapes import Shapes, input_shape, shapes_for

__all__ = ["compile", "prepare", "load", "Compiled", "Prepared", "StageLog"]


def compile(model: Any, budget: float = 1.0, *, objective: str = "latency", prompt_len: int | None = None,
            gen_len: int = 0, batch: int | None = None, target: str = "h100", passes: list[str] | None = None,
            calib: str | Path | None = None, tokenizer: str | Path | None = None,
            calib_windows: int | None = None, calib_len: int | None = None,
            eval_text: str | Path | None = None, seed: int = 0, formats: tuple[str, ...] | None = None,
            trust_remote_code: bool = False, device: str = "auto", dtype: str = "auto",
            max_memory: dict | str | None = None,
            attn_lengths: list[int] | None = None, validation_len: int | None = None,
            retrieval_template: dict | None = None, plan: str | Path | Plan | None = None,
            refit: bool = True, use_cache: bool = True, progress: bool = False,
            hf_compatible: bool = False, tune_trials: int = 0, stages: StageLog | None = None) -> Compiled:
    """Compile `model` (an HF model, an HF directory or an .onnx path) to cost at most `budget`
    of the original under `objective` (latency | flops | kv_memory | attention) for a workload
    of `batch` sequences of `prompt_len` prompt tokens and `gen_len` generated tokens on `target`
    (defaults: 1 and 1024, or the batch and length an ONNX graph fixes: tailor.stages.shapes).
    Calibration: `calib_windows` windows of `calib_len` tokens (defaults: 8192 tokens in windows
    of 512; an encoder given text and no `calib_len` calibrates on its lines whole, 16384 tokens
    of them). Attention patterns are profiled at `attn_lengths` (default prompt_len/2 and
    prompt_len) and plans validated at `validation_len` (default 3/4 prompt_len), with synthetic
    retrieval sequences written from `retrieval_template` (default: of tailor.data.retrieval.
    TEMPLATES, the form the model answers most; the check draws every form it answers). `refit`
    False leaves out the sequential refit after the search (tailor.passes.refit). `tune_trials` > 0
    (format tvm) tunes the TVM build's heavy kernels with that many MetaSchedule samples in all
    (tailor.codegen.tvm.tune).
    `plan` (a plan.json or Plan made for this model) replays that plan instead of searching: its
    budget, objective, workload and target replace those given; calibration still runs, since
    the rewrites' compensation is fitted on this model's activations. A torch model is compiled
    on `device` (auto | cpu | cuda | cuda:N; auto: a GPU when there is one, for a module where it
    is) in `dtype` (auto | float32 | bfloat16 | float16; auto: the checkpoint's on a GPU, float32
    on the CPU, a module's own), and the result stays there. A model bigger than one GPU is
    spread by accelerate: files are loaded with device_map="auto" over the devices `max_memory`
    names ({0: "70GiB", 1: "70GiB", "cpu": "100GiB"}, or "0=70GiB,1=70GiB,cpu=100GiB"), or over
    every GPU and host memory where they do not fit the GPU; a module dispatched by accelerate
    already is compiled as it is placed, and the result stays dispatched the same way.
    Format "hf" also writes a standard transformers checkpoint (tailor.backends.hf_checkpoint),
    refused where the plan has rewrites a standard config cannot say; `hf_compatible` searches
    only plans it can say (and adds "hf" to the default formats), measuring the unrestricted
    plan too: report["hf_compatible"] compares the two."""
    stages = stages or StageLog()
    given = _saved_plan(plan) if plan is not None else None
    if given is not None:
        budget, objective, target = given.budget, given.objective, given.target
        # keys and values checked by Plan.from_json
        batch, prompt_len = given.workload.get("batch"), given.workload.get("prompt_len")
        gen_len = given.workload.get("gen_len", 0)
    else:
        budget = check_budget(budget)
        _check_request(objective, passes)
    if hf_compatible and given is not None:
        raise TailorError("hf_compatible (--hf-compatible) restricts the search, and a replayed plan is not "
                          "searched; format hf writes it as a standard checkpoint where that can be said")
    if hf_compatible and formats is None:
        formats = ("safetensors", "hf")
    if check_trials(tune_trials) and "tvm" not in (formats or ()):
        raise TailorError("tune_trials (--tune-trials) tunes the TVM build: add format tvm")

    with stages("capture"):
        cap = capture(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype,
                      max_memory=resolve_max_memory(max_memory))
        dense = backend_for(cap)
    if hf_compatible and cap.source.backend != "torch":
        raise TailorError("hf_compatible (--hf-compatible) searches what a standard transformers checkpoint "
                          "can say: it needs a transformers model, not an ONNX file")
    graph, formats = cap.graph, resolve_formats(formats, cap)
    cached_decoder = cap.source.backend == "onnx" and has_cache(cap.source.model)
    hf_arch = architecture(cap.source.module) if "hf" in formats or hf_compatible else None
    written_arch = hf_arch if "hf" in formats else None  # a standard checkpoint is written for it
    shapes = shapes_for(cap, batch=batch, prompt_len=prompt_len, gen_len=gen_len, calib_len=calib_len,
                        attn_lengths=attn_lengths, validation_len=validation_len)
    workload = shapes.workload
    replayed = _replayed_options(given, plan, cap, dense) if given is not None else None
    cost_model = cost_model_for(cap, dense, workload, target, fit=replayed is not None or budget < 1.0,
                                use_cache=use_cache, int8="int8" in _pass_names(passes, replayed),
                                formats=formats, progress=progress)
    # the plan says what the user asked; whether the head keeps the last logits follows the model
    result = Plan(cap.model_hash, budget, objective, {k: getattr(workload, k) for k in WORKLOAD_KEYS},
                  target=target)
    report: dict[str, Any] = {"model": describe(graph, workload) | placement(cap),
                              "cost_model": cost_model.to_json(),
                              "clean_ups": clean_ups(cap)}
    if replayed is not None:
        report["replayed_plan"] = str(plan) if not isinstance(plan, Plan) else "plan"
    if (budget >= 1.0 and replayed is None) or replayed == []:
        result.predicted = cost_model.ratios(structure_of(graph, [])) if replayed is not None else \
            {o: 1.0 for o in OBJECTIVES}
        return _compiled(dense, dense, result, report, cap, formats, stages,
                         _standard(graph, [], written_arch), tune_trials)

    prepared = _prepared(cap, dense, cost_model, report, stages, budget=budget, objective=objective,
                         shapes=shapes, passes=passes, replayed=replayed, calib=calib,
                         tokenizer=tokenizer, calib_windows=calib_windows, seed=seed,
                         retrieval_template=retrieval_template, use_cache=use_cache, progress=progress,
                         restricted=hf_arch if hf_compatible else None, formats=formats)
    prof, options, meter = prepared.profile, prepared.options, prepared.meter
    heldout, cal = prepared.heldout, prepared.calibration
    if replayed is None:
        with stages("search"):
            estimated = set(prof.option_estimate)
            same = one_cache_shape(graph) if cached_decoder else ()
            if hf_compatible:  # what the restriction costs: the unrestricted plan, measured alike
                free, free_model, free_kl = searched_plan(dense, options, prof.signals, cost_model, budget,
                                                          objective, heldout, meter, estimated,
                                                          prepared.settings["device"])
                free_model.close()
                estimated -= set(free.refined)
                options, same = sayable(options, hf_arch), uniform(graph)
            search, variant, kl = searched_plan(dense, options, prof.signals, cost_model, budget, objective,
                                                heldout, meter, estimated, prepared.settings["device"], same,
                                                allowed=(lambda o: unsayable(o, hf_arch) is None)
                                                if hf_compatible else None)
            meter.close()
            refined = (free.refined if hf_compatible else {}) | search.refined
            if refined:
                prof.add_measured(refined)
                if use_cache:  # a compile at another budget starts from them
                    store(prof)
        chosen = search.chosen
        report["search"] = {"predicted_kl": search.predicted_kl, "measured_kl_heldout": search.measured_kl,
                            "iterations": search.iterations, "candidates": len(options),
                            "options_measured": len(search.refined), "max_plan_checks": search.max_checks}
        if cached_decoder:
            report["search"]["restricted"] = ("one KV head count in every cache kept: clients of a decoder "
                                              "with its cache as inputs size it from one config value")
        if hf_compatible:
            report["hf_compatible"] = {
                "measured_kl_heldout": kl, "unrestricted_measured_kl_heldout": free_kl,
                "unrestricted_plan": [o.label for o in free.chosen],
                "measured": "both plans searched at this budget and measured on the same held-out "
                            "calibration data, before the sequential refit"}
    else:
        chosen = replayed
        with stages("rewrite"):
            variant = apply_options(dense.clone(), chosen, prof.signals)
            kl = heldout.divergence(variant)
        report["search"] = {"measured_kl_heldout": kl}
    # every rewrite is applied: the grams of its compensation (SmolLM2's 30 layers in float64:
    # 0.65 GB) would otherwise stay through the refit, beside three models and its statistics
    prof.signals.drop_grams()
    standard = _standard(graph, chosen, written_arch)  # refused here, before refit and evaluation
    if chosen and refit:
        with stages("refit"):
            variant, report["refit"] = refitted(dense, variant, kl, chosen, cal, heldout, progress)
            report["search"]["measured_kl_heldout"] = report["refit"]["measured_kl_heldout"]
    result.rewrites = [o.to_json() for o in chosen]
    int8 = [o.label for o in chosen if o.pass_name == "int8"]
    if int8:
        report["int8"] = {"branches": int8, "method": dense.int8_method}
    result.predicted = cost_model.ratios(structure_of(graph, chosen))
    report |= profile_report(prof, cal)
    attn = prepared.settings.get("attn", {})
    report["calibration"] |= {"retrieval_forms": attn.get("forms", []),
                              "dense_answered": attn.get("dense_answered"),
                              "heldout_retrieval_answered": len(heldout.retrieval)}
    if cost_model.measured_ratios:  # priced for this machine: check it here, against the input as given
        report["measured_latency"] = measured_latency(cap, dense, variant, workload, progress)
    if eval_text is not None and chosen:
        with stages("evaluate"):
            lengths = [n for n in (graph.max_positions, input_shape(cap).length) if n is not None]
            report["quality"] = evaluate_pair(dense.runnable(), variant.runnable(), Path(eval_text),
                                              tokenizer_path(cap.source, tokenizer), graph.task,
                                              max_len=min(lengths, default=None))
    return _compiled(dense, variant, result, report, cap, formats, stages, standard, tune_trials)


def _standard(graph, chosen: list[Option], arch: StandardArchitecture | None) -> StandardShape | None:
    """The plan's standard checkpoint shape where format hf is asked for (None otherwise)."""
    return standard_shape(graph, chosen, arch) if arch is not None else None


@dataclass
class Prepared:
    """A model as compile() has it when it starts planning: captured, priced, calibrated and
    profiled, each candidate option with its estimated loss and its cost."""
    captured: Captured
    dense: Backend
    cost_model: CostModel
    calibration: Calibration
    profile: Profile
    options: list[Option]
    meter: OptionMeter
    heldout: HeldOut
    settings: dict[str, Any]
    report: dict[str, Any]


def prepare(model: Any, budget: float, *, objective: str = "latency", prompt_len: int | None = None,
            gen_len: int = 0, batch: int | None = None, target: str = "h100", passes: list[str] | None = None,
            calib: str | Path | None = None, tokenizer: str | Path | None = None,
            calib_windows: int | None = None, calib_len: int | None = None, seed: int = 0,
            trust_remote_code: bool = False, device: str = "auto", dtype: str = "auto",
            max_memory: dict | str | None = None,
            attn_lengths: list[int] | None = None, validation_len: int | None = None,
            retrieval_template: dict | None = None, use_cache: bool = True, progress: bool = False,
            stages: StageLog | None = None) -> Prepared:
    """What compile() does before it plans, with the same arguments (and the same profile cache):
    for tools that build plans of their own on the same model, data and prices (the baselines
    of benchmarks/real_llm.py)."""
    stages = stages or StageLog()
    budget = check_budget(budget)
    _check_request(objective, passes)
    with stages("capture"):
        cap = capture(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype,
                      max_memory=resolve_max_memory(max_memory))
        dense = backend_for(cap)
    shapes = shapes_for(cap, batch=batch, prompt_len=prompt_len, gen_len=gen_len, calib_len=calib_len,
                        attn_lengths=attn_lengths, validation_len=validation_len)
    cost_model = cost_model_for(cap, dense, shapes.workload, target, fit=budget < 1.0, use_cache=use_cache,
                                int8="int8" in _pass_names(passes, None), progress=progress)
    report = {"model": describe(cap.graph, shapes.workload) | placement(cap),
              "cost_model": cost_model.to_json()}
    return _prepared(cap, dense, cost_model, report, stages, budget=budget, objective=objective,
                     shapes=shapes, passes=passes, replayed=None, calib=calib,
                     tokenizer=tokenizer, calib_windows=calib_windows, seed=seed,
                     retrieval_template=retrieval_template, use_cache=use_cache, progress=progress)


def _pass_names(passes: list[str] | None, replayed: list | None) -> list[str]:
    """The passes a compile searches (all by default), or those of the plan it replays."""
    return sorted({o.pass_name for o in replayed}) if replayed is not None else list(passes or PASSES)


def _prepared(cap: Captured, dense: Backend, cost_model: CostModel, report: dict, stages: StageLog, *,
              budget: float, objective: str, shapes: Shapes, passes: list[str] | None,
              replayed: list[Option] | None, calib, tokenizer, calib_windows, seed: int,
              retrieval_template, use_cache: bool, progress: bool,
              restricted: StandardArchitecture | None = None, formats: tuple[str, ...] = ()) -> Prepared:
    """Calibrate and profile the passes worth searching (a replayed plan's: signals only), and
    price their options. `restricted`: the budget must be reachable by what a standard config of
    that architecture can say; `formats`: what the artifact will hold (INT8 where it can run)."""
    passes_given = passes is not None
    passes = _pass_names(passes, replayed)
    if replayed is not None and "int8" in passes:
        refusal = int8_refusal(dense, cost_model, formats)
        if refusal is not None:
            raise TailorError(f"the plan's int8 rewrites: {refusal}")
    lengths = shapes.attn_lengths
    grid = default_grid(max(lengths))
    if restricted is not None and restricted.sliding:  # the patterns a standard config can say
        grid += sliding_windows(max(lengths), restricted.sliding_window)
    if dense.graph_kv_cache:  # fixed windows only (Backend.graph_kv_cache)
        grid = [p for p in grid if p.beta == 0]
    if replayed is None:
        passes = _searchable(dense, passes, asked=passes_given, cost_model=cost_model, grid=grid,
                             lengths=lengths, objective=objective, budget=budget, report=report,
                             restricted=restricted, formats=formats)

    with stages("calibrate"):
        cal = calibration(dense, cap.source, calib, tokenizer, calib_windows, shapes.calib_len, seed)
        settings: dict[str, Any] = {"windows": len(cal.profile_ids) + len(cal.heldout_ids),
                                    "len": input_len(cal.profile_ids), "seed": seed,
                                    # numbers differ by precision and kind of device, not by GPU index
                                    "dtype": report["model"]["dtype"],
                                    "device": report["model"]["device"].split(":")[0]}
        settings |= attention_data(cal, dense, cap.source, tokenizer, passes, lengths, shapes.validation_len,
                                   retrieval_template, seed, grid, settings["device"])
    with stages("profile"):
        # a replayed plan's options need the signals only: nothing to measure
        prof, options, meter = run_profile(dense, cal, passes if replayed is None else [],
                                           model_hash=cap.model_hash, settings=settings, progress=progress,
                                           use_cache=use_cache)
        # the dense model's outputs the plans are checked against
        heldout = HeldOut(dense, cal, settings["device"])
    for o in options:  # measured alone, or estimated from its proxy; the pass's own estimate
        o.loss = prof.loss(o)
    price(options, cost_model)
    return Prepared(cap, dense, cost_model, cal, prof, options, meter, heldout, settings, report)


def _check_request(objective: str, passes: list[str] | None) -> None:
    if objective not in OBJECTIVES:
        raise TailorError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    unknown = sorted(set(passes or ()) - set(PASSES))
    if unknown:
        raise TailorError(f"unknown pass(es) {', '.join(unknown)}; available: {', '.join(PASSES)}")


def _saved_plan(plan: str | Path | Plan) -> Plan:
    return plan if isinstance(plan, Plan) else Plan.load(Path(plan))


def _replayed_options(given: Plan, plan: str | Path | Plan, cap: Captured, dense: Backend) -> list[Option]:
    """The saved plan's options, checked against the model they are replayed on."""
    where = "plan" if isinstance(plan, Plan) else str(plan)
    if given.model_hash != cap.model_hash:
        raise TailorError(f"{where}: made for another model (hash {given.model_hash[:12]}…, this model "
                          f"is {cap.model_hash[:12]}…)")
    return options_from_plan(cap.graph, given.rewrites, where, dense)


def _searchable(dense: Backend, passes: list[str], *, asked: bool, cost_model: CostModel, grid, lengths,
                objective: str, budget: float, report: dict,
                restricted: StandardArchitecture | None = None, formats: tuple[str, ...] = ()) -> list[str]:
    """The passes worth searching, and a check before any calibration that the budget can be
    reached at all (costs depend on shapes only)."""
    graph = dense.graph
    neutral = neutral_signals(graph)
    neutral.attention = AttentionInfluence.unmeasured(graph, lengths, grid)
    if not asked and not dense.profiles_patterns_cheaply and "attn_pattern" in passes:
        headroom = pattern_headroom(cost_model, graph, grid, objective)
        if headroom < MIN_PATTERN_HEADROOM:
            passes = [p for p in passes if p != "attn_pattern"]
            report["attn_pattern_skipped"] = (
                f"every head on its narrowest pattern would save {headroom:.1%} of the {objective} "
                f"at this workload (< {MIN_PATTERN_HEADROOM:.0%}); ask for it with passes")
    if "int8" in passes:
        refusal = int8_refusal(dense, cost_model, formats)
        if refusal is not None and asked:
            raise TailorError(f"pass int8: {refusal}")
        if refusal is not None:
            passes = [p for p in passes if p != "int8"]
            report["int8_skipped"] = refusal
    structural = offered(dense, neutral, passes)
    price(structural, cost_model)
    if restricted is not None:
        check_reachable(sayable(structural, restricted), cost_model, budget, objective, uniform(graph))
    check_reachable(structural, cost_model, budget, objective)
    return passes


def _compiled(dense: Backend, rewritten: Backend, plan: Plan, report: dict, cap: Captured,
              formats: tuple[str, ...], stages: StageLog, standard: StandardShape | None = None,
              tune_trials: int = 0) -> Compiled:
    report["plan"] = {"rewrites": plan.rewrites, "predicted_cost_ratio": plan.predicted}
    report["stages"] = stages.to_json()
    if standard is not None:
        report["hf_checkpoint"] = {"folder": HF_DIR, "architecture": type(cap.source.module).__name__,
                                   "layers": len(standard.kept_layers),
                                   "kept_layers": list(standard.kept_layers),
                                   "intermediate_size": standard.ffn_width,
                                   "num_attention_heads": standard.heads,
                                   "num_key_value_heads": standard.kv_heads,
                                   "sliding_window": standard.sliding_window,
                                   "sliding_layers": list(standard.sliding_layers)}
    return Compiled(rewritten.runnable(), plan, report, cap.graph, cap.source, formats, rewritten=rewritten,
                    standard=standard, tune_trials=tune_trials)
