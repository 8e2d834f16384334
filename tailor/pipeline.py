"""tailor.compile() and tailor.load(): the pipeline of DESIGN.md, read top to bottom.

    capture -> (profile -> search -> rewrite) -> runnable model + plan + report -> save
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from tailor.backends.export import export_onnx, save_onnx
from tailor.backends.runners import HFModel, OrtModel, as_runnable
from tailor.core.errors import TailorError
from tailor.core.patterns import Pattern
from tailor.core.plan import Plan, check_budget
from tailor.core.targets import get_target
from tailor.data.calibration import (
    DEFAULT_CALIB_LEN,
    Calibration,
    Lines,
    add_attention_data,
    calibration_data_free,
    calibration_from_ids,
    calibration_from_text,
)
from tailor.data.retrieval import RetrievalTemplate
from tailor.data.text import has_tokenizer, load_tokenizer, read_text_pieces
from tailor.passes.attention_profile import AttentionInfluence
from tailor.passes.attn_pattern import default_grid
from tailor.passes.cost import OBJECTIVES, CostModel, Structure, Workload, model_flops
from tailor.passes.measure import clone, divergence, model_outputs
from tailor.passes.profile import apply_options, collect_signals, neutral_signals, run_profile
from tailor.passes.refit import refit_sequentially
from tailor.passes.registry import PASSES, candidates_for, options_from_plan
from tailor.passes.search import check_reachable, price, search, structure_of
from tailor.quality.metrics import evaluate_pair, time_side_by_side
from tailor.quality.plots import plan_picture
from tailor.rewriter.capture import (
    TOKENIZER_FILES,
    Captured,
    OnnxSource,
    TorchSource,
    capture,
    example_input_ids,
    load_hf_directory,
)
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.onnx_sparse_attention import blocked_keys
from tailor.runtime.artifact import verify_artifact, write_artifact

FORMATS = ("safetensors", "onnx", "tvm")   # tvm: a CPU build of model.onnx, so it implies onnx
CALIB_TOKENS = 8192  # default calibration size, in tokens
# an encoder's lines are short and its layers cheap: more of them (MiniLM at 0.75, nominal cpu
# target, benchmarks/encoder_calibration.py: embedding cosine 0.9513 on 8192 tokens of lines,
# 0.9562 on 16384)
ENCODER_CALIB_TOKENS = 16384
BASE_CONFIG = "base_config.json"


@dataclass
class Compiled:
    model: torch.nn.Module      # model(input_ids [B, T]) -> logits or hidden states
    plan: Plan
    report: dict[str, Any]
    graph: TransformerGraph | None = None
    source: TorchSource | OnnxSource | None = field(default=None, repr=False)
    formats: tuple[str, ...] = ()
    run_config: dict[str, Any] | None = None
    rewritten: Any = field(default=None, repr=False)   # the rewritten transformers or onnx_ir model

    def generate(self, prompts, max_new_tokens: int, **sampling) -> list[list[int]]:
        """Continue token-id prompts with the per-head KV cache (tailor.runtime.generate): Triton
        kernels where the model is on CUDA, their torch references elsewhere."""
        from tailor.runtime.generate import generate

        if not isinstance(self.model, HFModel):
            raise TailorError("generate() runs transformers decoders; this artifact holds an ONNX model")
        return generate(self.model, prompts, max_new_tokens, **sampling)

    def save(self, out: str | Path, *, force: bool = False, check=None) -> Path:
        """Write the artifact directory atomically; refuses to replace one unless force.
        check(tmp_dir), if given, validates the written artifact before it is moved into place."""
        if self.source is None:
            raise TailorError("this Compiled was loaded from an artifact; copy the folder instead")
        return write_artifact(Path(out), self._write, force=force, check=check)

    def _write(self, tmp: Path) -> None:
        (tmp / "plan.json").write_text(self.plan.dumps())
        self._write_model(tmp)
        if "tvm" in self.formats:
            self._build_tvm(tmp)
        (tmp / "report.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        if self.plan.rewrites and self.graph is not None:
            plan_picture(self.graph, self.plan.rewrites, tmp / "plan.png",
                         length=self.plan.workload.get("prompt_len", 1024))
        if self.run_config is not None:
            (tmp / "run.yaml").write_text(yaml.safe_dump(self.run_config, sort_keys=False))

    def _write_model(self, tmp: Path) -> None:
        src = self.source
        if isinstance(src, OnnxSource):
            if self.plan.rewrites:
                save_onnx(self.rewritten, tmp / "model.onnx")
            else:  # nothing rewritten: the input itself, byte for byte
                shutil.copyfile(src.path, tmp / "model.onnx")
                for loc in src.data_files:
                    (tmp / loc).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src.path.parent / loc, tmp / loc)
            _copy_tokenizer(src.path.parent, tmp)
            return
        module = self.model.inner  # the rewritten model (the source itself at budget 1.0)
        if "safetensors" in self.formats:
            module.save_pretrained(tmp, safe_serialization=True)
            if self.plan.rewrites:
                # reloading replays the plan's structure on the original architecture
                base = src.module.config.to_dict()
                base["architectures"] = [type(src.module).__name__]
                (tmp / BASE_CONFIG).write_text(json.dumps(base, indent=2, default=str))
        if "onnx" in self.formats:
            export_onnx(module, tmp / "model.onnx", encoder=self.graph.task == "encoder")
        if src.path is not None:
            _copy_tokenizer(src.path, tmp)

    def _build_tvm(self, tmp: Path) -> None:
        """model.so + weights from the written model.onnx, for the plan's workload shape."""
        from tailor.codegen.tvm.build import build

        w = self.plan.workload
        info = build(tmp / "model.onnx", tmp, batch=w.get("batch", 1), seq_len=w.get("prompt_len", 1024),
                     causal=self.graph.task == "causal-lm", vocab_size=self.graph.vocab_size)
        info = {k: v for k, v in info.items() if k != "params"}
        if any(r["pass"] == "attn_pattern" for r in self.plan.rewrites):
            info["attention"] = (
                "attention patterns run in TVM as the block-sparse ONNX ops (gathers and batched "
                "products, untuned)" if isinstance(self.source, OnnxSource) else
                "attention patterns run in TVM as dense attention under a mask: correct, but no "
                "attention work is saved (the exported graph masks; no sparse TVM lowering yet)")
        self.report["tvm"] = info


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Carry the tokenizer along so the artifact is usable on its own (JSON/text files only)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())


def compile(model: Any, budget: float = 1.0, *, objective: str = "latency", prompt_len: int = 1024,
            gen_len: int = 0, batch: int = 1, target: str = "h100", passes: list[str] | None = None,
            calib: str | Path | None = None, tokenizer: str | Path | None = None,
            calib_windows: int | None = None, calib_len: int | None = None,
            eval_text: str | Path | None = None, seed: int = 0, formats: tuple[str, ...] | None = None,
            trust_remote_code: bool = False,
            attn_lengths: list[int] | None = None, validation_len: int | None = None,
            retrieval_template: dict | None = None, plan: str | Path | Plan | None = None,
            refit: bool = True, use_cache: bool = True, progress: bool = False,
            stages: "StageLog | None" = None) -> Compiled:
    """Compile `model` (an HF model, an HF directory or an .onnx path) to cost at most `budget`
    of the original under `objective` (latency | flops | kv_memory | attention) for a workload
    of `batch` sequences of `prompt_len` prompt tokens and `gen_len` generated tokens on `target`.
    Calibration: `calib_windows` windows of `calib_len` tokens (defaults: 8192 tokens in windows
    of 512; an encoder given text and no `calib_len` calibrates on its lines whole, 16384 tokens
    of them). Attention patterns are
    profiled at `attn_lengths` (default prompt_len/2 and prompt_len) and
    plans validated at `validation_len` (default 3/4 prompt_len), with synthetic retrieval
    sequences written from `retrieval_template` (default: code-shaped `name = value` lines).
    `refit` False leaves out the sequential refit after the search (tailor.passes.refit).
    `plan` (a plan.json or Plan made for this model) replays that plan instead of searching: its
    budget, objective, workload and target replace those given; calibration still runs, since
    the rewrites' compensation is fitted on this model's activations."""
    if plan is not None:
        return _replay(model, plan, trust_remote_code=trust_remote_code, calib=calib, tokenizer=tokenizer,
                       calib_windows=calib_windows, calib_len=calib_len, eval_text=eval_text, seed=seed,
                       formats=formats, stages=stages)
    budget = check_budget(budget)
    if objective not in OBJECTIVES:
        raise TailorError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    unknown = sorted(set(passes or ()) - set(PASSES))
    if unknown:
        raise TailorError(f"unknown pass(es) {', '.join(unknown)}; available: {', '.join(PASSES)}")
    stages = stages or StageLog()
    with stages("capture"):
        cap = capture(model, trust_remote_code=trust_remote_code)
    asked, passes = passes, _passes_for(cap, passes)
    formats = _resolve_formats(formats, cap)
    workload = Workload(batch=batch, prompt_len=prompt_len, gen_len=gen_len)
    cost_model = _cost_model(cap, workload, target, fit=budget < 1.0, use_cache=use_cache)
    plan = Plan(cap.model_hash, budget, objective,
                {"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len}, target=target)
    report: dict[str, Any] = {"model": describe(cap.graph, workload), "cost_model": cost_model.to_json(),
                              "clean_ups": _clean_ups(cap)}
    runnable: torch.nn.Module
    # what the passes rewrite: a transformers model, or the onnx_ir model of an ONNX input
    module = cap.source.module if isinstance(cap.source, TorchSource) else cap.source.model
    rewritten = module
    if budget >= 1.0:
        runnable = HFModel(module) if isinstance(cap.source, TorchSource) else OrtModel(cap.source.path)
        plan.predicted = {o: 1.0 for o in OBJECTIVES}
    else:
        graph = cap.graph
        lengths = sorted(attn_lengths or {max(64, prompt_len // 2), prompt_len})
        grid = default_grid(max(lengths))
        # before any calibration: is the budget reachable at all? (costs depend on shapes only)
        neutral = neutral_signals(graph)
        neutral.attention = AttentionInfluence.unmeasured(graph, lengths, grid)
        if asked is None and isinstance(cap.source, OnnxSource) and "attn_pattern" in passes:
            headroom = pattern_headroom(cost_model, graph, grid, objective)
            if headroom < MIN_PATTERN_HEADROOM:
                passes.remove("attn_pattern")
                report["attn_pattern_skipped"] = (
                    f"every head on its narrowest pattern would save {headroom:.1%} of the {objective} "
                    f"at this workload (< {MIN_PATTERN_HEADROOM:.0%}); ask for it with passes")
        structural = candidates_for(graph, neutral, passes)
        price(structural, cost_model)
        check_reachable(structural, cost_model, budget, objective)
        with stages("profile"):
            cal = _calibration(module, graph, cap.source, calib, tokenizer, calib_windows, calib_len, seed)
            windows_used = len(cal.profile_ids) + len(cal.heldout_ids)
            settings: dict[str, Any] = {"windows": windows_used, "len": _input_len(cal.profile_ids),
                                        "seed": seed}
            if graph.task == "causal-lm" or "attn_pattern" in passes:
                template = RetrievalTemplate.parse(retrieval_template or {})
                tok = _tokenizer_dir(cap.source, tokenizer)
                # retrieval sequences need the model's tokenizer: given, or beside the model
                usable = tok is not None and (tokenizer is not None or has_tokenizer(tok))
                add_attention_data(cal, lengths, validation_len or max(64, 3 * prompt_len // 4),
                                   load_tokenizer(tok) if usable and graph.task == "causal-lm" else None,
                                   template=template, seed=seed)
                if "attn_pattern" in passes:
                    settings["attn"] = {"lengths": lengths, "grid": [g.to_json() for g in grid],
                                        "template": asdict(template), "retrieval": cal.retrieval_weight}
            prof, options = run_profile(module, graph, cal, passes, model_hash=cap.model_hash,
                                        settings=settings, progress=progress, use_cache=use_cache)
            for o in options:  # measured alone where the pass measures; its own estimate otherwise
                o.loss = prof.option_kl.get(o.key, o.loss)
        with stages("search"):
            price(options, cost_model)
            heldout = HeldOut(module, graph, cal)

            best: dict[str, Any] = {}  # the best measured rewritten model: the search's answer

            def measure(chosen):
                variant = apply_options(clone(module), graph, chosen, prof.signals)
                kl = heldout.divergence(variant)
                if not best or kl < best["kl"]:
                    best.update(kl=kl, keys=sorted(o.key for o in chosen), model=variant)
                return kl

            result = search(options, cost_model, budget, objective, measure)
        with stages("rewrite"):
            if best.get("keys") == sorted(o.key for o in result.chosen):
                variant, kl = best["model"], best["kl"]
            else:
                variant = apply_options(clone(module), graph, result.chosen, prof.signals)
                kl = heldout.divergence(variant) if result.chosen else 0.0
        if result.chosen and refit:
            with stages("refit"):
                variant, report["refit"] = _refit(module, variant, kl, graph, result.chosen, cal, heldout,
                                                  progress)
        runnable, rewritten = as_runnable(variant), variant
        if cost_model.measured_ratios:  # priced for this machine: check it here, against the input as given
            given = OrtModel(cap.source.path) if isinstance(cap.source, OnnxSource) else as_runnable(module)
            t = _time_side_by_side({"original": given, "rewritten": runnable}, graph, workload)
            report["measured_latency"] = {"ratio": t["rewritten"] / t["original"],
                                          "original_ms": t["original"] * 1e3,
                                          "rewritten_ms": t["rewritten"] * 1e3}
        plan.rewrites = [o.to_json() for o in result.chosen]
        plan.predicted = cost_model.ratios(structure_of(graph, result.chosen))
        report["calibration"] = {"data": prof.data, "tokens": prof.tokens, "cached": prof.extra["cached"],
                                 "heldout_windows": len(cal.heldout_ids),
                                 "heldout_retrieval_sequences": len(cal.heldout_retrieval),
                                 "retrieval_weight": cal.retrieval_weight}
        if prof.signals.attention is not None:
            report["attention_profile"] = prof.signals.attention.to_json()
        report["search"] = {"predicted_kl": result.predicted_kl, "measured_kl_heldout": result.measured_kl,
                            "iterations": result.iterations, "candidates": len(options)}
        report["signals"] = {"block_influence": prof.signals.block_influence,
                             "ffn_contribution": prof.signals.ffn_contribution}
        if eval_text is not None:
            with stages("evaluate"):
                report["quality"] = evaluate_pair(as_runnable(module), runnable, Path(eval_text),
                                                  _tokenizer_dir(cap.source, tokenizer), graph.task)
    report["plan"] = {"rewrites": plan.rewrites, "predicted_cost_ratio": plan.predicted}
    report["stages"] = stages.times
    return Compiled(runnable, plan, report, cap.graph, cap.source, formats, rewritten=rewritten)


def _replay(model: Any, plan: str | Path | Plan, *, trust_remote_code: bool, calib, tokenizer,
            calib_windows: int | None, calib_len: int | None, eval_text, seed: int, formats,
            stages) -> Compiled:
    """compile(plan=...): apply a saved plan to the model it was made for."""
    where = "plan" if isinstance(plan, Plan) else str(plan)
    given = plan if isinstance(plan, Plan) else Plan.load(Path(plan))
    stages = stages or StageLog()
    with stages("capture"):
        cap = capture(model, trust_remote_code=trust_remote_code)
    if given.model_hash != cap.model_hash:
        raise TailorError(f"{where}: made for another model (hash {given.model_hash[:12]}…, this model "
                          f"is {cap.model_hash[:12]}…)")
    graph = cap.graph
    chosen = options_from_plan(graph, given.rewrites, where)
    _passes_for(cap, sorted({o.pass_name for o in chosen}))  # each has a rewrite for this input
    workload = Workload(**given.workload)  # keys and values checked by Plan.from_json
    cost_model = _cost_model(cap, workload, given.target)
    replayed = Plan(cap.model_hash, given.budget, given.objective, asdict(workload), target=given.target,
                    rewrites=[o.to_json() for o in chosen],
                    predicted=cost_model.ratios(structure_of(graph, chosen)))
    module = cap.source.module if isinstance(cap.source, TorchSource) else cap.source.model
    report: dict[str, Any] = {"model": describe(graph, workload), "replayed_plan": where,
                              "cost_model": cost_model.to_json(), "clean_ups": _clean_ups(cap)}
    if chosen:
        with stages("profile"):
            cal = _calibration(module, graph, cap.source, calib, tokenizer, calib_windows, calib_len, seed)
            signals = collect_signals(module, graph, cal.profile_ids)
        with stages("rewrite"):
            rewritten = apply_options(clone(module), graph, chosen, signals)
            heldout = HeldOut(module, graph, cal)
            kl = heldout.divergence(rewritten)
        with stages("refit"):
            rewritten, report["refit"] = _refit(module, rewritten, kl, graph, chosen, cal, heldout, False)
        report["search"] = {"measured_kl_heldout": report["refit"]["measured_kl_heldout"]}
    else:
        rewritten = module
    runnable = as_runnable(rewritten)
    if eval_text is not None and chosen:
        with stages("evaluate"):
            report["quality"] = evaluate_pair(as_runnable(module), runnable, Path(eval_text),
                                              _tokenizer_dir(cap.source, tokenizer), graph.task)
    report["plan"] = {"rewrites": replayed.rewrites, "predicted_cost_ratio": replayed.predicted}
    report["stages"] = stages.times
    return Compiled(runnable, replayed, report, graph, cap.source, _resolve_formats(formats, cap),
                    rewritten=rewritten)


def _refit(module, variant, kl: float, graph: TransformerGraph, chosen: list, cal: Calibration,
           heldout: "HeldOut", progress: bool) -> tuple[Any, dict[str, Any]]:
    """The plan's model refitted in sequence (tailor.passes.refit), kept where the held-out
    windows say it is closer to the original; the report says which, with both figures."""
    removed = {o.layer for o in chosen if o.pass_name == "layer_skip"}
    refitted = refit_sequentially(module, clone(variant), graph, cal.profile_ids, removed=removed,
                                  progress=progress)
    after = heldout.divergence(refitted)
    kept = after < kl
    return (refitted if kept else variant), {"measured_kl_heldout_before": kl,
                                            "measured_kl_heldout_after": after, "kept": kept,
                                            "measured_kl_heldout": min(kl, after)}


def _cost_model(cap: Captured, workload: Workload, target: str, *, fit: bool = True,
                use_cache: bool = True) -> CostModel:
    """The cost model for `target`; for a table measured on this machine, fitted to this model
    here (CostModel.fit_to_measured): the dense model and the variants of `_fit_variants` timed
    side by side. The measured ratios are cached with the profiles (keyed by the model, the
    table and the workload) so that compiling again reaches the same plan."""
    cost_model = CostModel(cap.graph, workload, get_target(target))
    if not fit or not cost_model.target.matmul_rates or workload.gen_len:
        return cost_model
    graph = cap.graph
    variants = _fit_variants(graph, workload)
    if not variants:
        cost_model.fit_skipped = "neither the FFNs nor the heads of this model can be sliced"
        return cost_model
    from tailor.core.cache import cache_dir

    key = hashlib.sha256(json.dumps({"model": cap.model_hash, "target": asdict(cost_model.target),
                                     "workload": asdict(workload), "variants": sorted(variants)},
                                    sort_keys=True).encode()).hexdigest()[:24]
    cached = cache_dir() / "fits" / f"{key}.json"
    timed = set(variants) | ({CLEAN_UP} if _clean_ups(cap) else set())
    ratios = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        if use_cache:
            ratios = {name: float(r) for name, r in json.loads(cached.read_text())["ratios"].items()}
            if set(ratios) != timed or not all(0 < r < 10 for r in ratios.values()):
                ratios = None
    if ratios is None:
        try:
            ratios = _time_variants(cap, variants, workload)
        except TailorError as e:  # priced unfitted rather than not at all; the report says why
            cost_model.fit_skipped = str(e)
            return cost_model
        if use_cache:
            with contextlib.suppress(OSError):
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"ratios": ratios}))
                os.replace(tmp, cached)
    cost_model.fit_to_measured({n: (structure_of(graph, o), ratios[n]) for n, o in variants.items()})
    cost_model.baseline = ratios.get(CLEAN_UP, 1.0)
    return cost_model


def _clean_ups(cap: Captured) -> dict[str, int]:
    """The lossless clean-ups capture made to an ONNX input (tailor.rewriter.cleanup)."""
    return cap.source.cleaned if isinstance(cap.source, OnnxSource) else {}


# the name under which the fit times the dense model against the ONNX input it was cleaned from
CLEAN_UP = "clean_up"


def _time_variants(cap: Captured, variants: dict[str, list], workload: Workload) -> dict[str, float]:
    """Each variant's latency / the dense model's, all timed side by side (TailorError: a variant
    could not be built); and where lossless clean-ups changed an ONNX input, the dense model's /
    the input's as given (CLEAN_UP)."""
    module = cap.source.module if isinstance(cap.source, TorchSource) else cap.source.model
    runnables = {"original": as_runnable(module)}
    if _clean_ups(cap):
        runnables["input"] = OrtModel(cap.source.path)
    for name, options in variants.items():
        try:
            runnables[name] = as_runnable(apply_options(clone(module), cap.graph, options, None))
        except TailorError as e:
            raise TailorError(f"the variant {name} could not be built: {e}") from None
    t = _time_side_by_side(runnables, cap.graph, workload, repeats=FIT_REPEATS)
    ratios = {name: t[name] / t["original"] for name in variants}
    return ratios | ({CLEAN_UP: t["original"] / t["input"]} if "input" in t else {})


# calls of each fit variant timed (after as many warm-up calls): three runs of refllama-16m's
# fit at 20 gave its half-width variant 0.810, 0.822 and 0.829 of the dense model
FIT_REPEATS = 30


def _fit_variants(graph: TransformerGraph, workload: Workload) -> dict[str, list]:
    """The structures the cost model is fitted on, as options (shapes only: the timing does not
    depend on the weights): every FFN at half width; every attention with half its query heads
    (half its KV heads where each KV head serves one query head); on an ONNX graph whose attention
    is decomposed, every KV head on the default grid's narrowest pattern, and on its widest that
    keeps at most half the keys (block-sparse ops: what they cost whatever the pattern, and per
    key). A layer that cannot be sliced stays whole; a variant no layer can take is left out."""
    n, causal = workload.prompt_len, graph.blocks[0].attn.causal
    by_keys = sorted(default_grid(n), key=lambda p: blocked_keys(p, n, causal))
    narrow = by_keys[0]
    wide = [narrow, *(p for p in by_keys if blocked_keys(p, n, causal) <= n / 2)][-1]
    ffn, heads, narrow_all, wide_all = [], [], [], []
    for b in graph.blocks:
        a = b.attn
        q_per = a.num_heads // a.num_kv_heads
        kv = list(range(a.num_kv_heads if q_per > 1 else a.num_kv_heads // 2))
        with contextlib.suppress(ValueError):
            ffn.append(PASSES["ffn_prune"].from_plan(graph, b.index,
                                                     {"channels": list(range(b.ffn.width // 2))}))
        with contextlib.suppress(ValueError):
            if kv:
                heads.append(PASSES["head_prune"].from_plan(
                    graph, b.index, {"kv_heads": kv, "queries": [list(range(max(1, q_per // 2)))] * len(kv)}))
        if graph.backend == "onnx" and a.kind == "decomposed":
            for pattern, options in ((narrow, narrow_all), (wide, wide_all)):
                spans = [pattern.to_json()] * a.num_kv_heads
                options.append(PASSES["attn_pattern"].from_plan(graph, b.index, {"spans": spans}))
    return {name: options for name, options in (("ffn_half", ffn), ("heads_half", heads),
                                                ("patterns_narrowest", narrow_all),
                                                ("patterns_wide", wide_all if wide != narrow else []))
            if options}


def _time_side_by_side(models: dict, graph: TransformerGraph, workload: Workload,
                       repeats: int = 20) -> dict[str, float]:
    """Median seconds of each model on the workload's prompt, timed in turn after 20 warm-up
    calls each (onnxruntime's first dozens of calls run ~10% slower)."""
    ids = torch.randint(0, graph.vocab_size, (workload.batch, workload.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    return time_side_by_side(models, ids, repeats=repeats, warmup=20)


# an ONNX model's attention profile runs the whole model per (layer, KV head, pattern): offered
# by default only where patterns can pay for it (MiniLM at 128 tokens: 7%, refllama-16m at 512: 22%)
MIN_PATTERN_HEADROOM = 0.10


def pattern_headroom(cost_model: CostModel, graph: TransformerGraph, grid: list[Pattern],
                     objective: str) -> float:
    """The share of the objective saved with every KV head on the grid's cheapest pattern."""
    n = cost_model.workload.prompt_len
    narrowest = min(grid, key=lambda p: blocked_keys(p, n, graph.blocks[0].attn.causal))
    sparse = Structure.dense(graph)
    for shape in sparse.layers:
        shape.kv_patterns = (narrowest,) * shape.kv_groups
    return 1.0 - cost_model.ratio(sparse, objective)


def _passes_for(cap: Captured, asked: list[str] | None) -> list[str]:
    """The passes to search over: those asked for (default all) that the input's back end has."""
    if isinstance(cap.source, TorchSource):
        return list(asked) if asked is not None else list(PASSES)
    onnx = [name for name, p in PASSES.items() if hasattr(p, "apply_onnx")]
    missing = sorted(set(asked or ()) - set(onnx))
    if missing:
        raise TailorError(f"pass(es) {', '.join(missing)} have no ONNX rewrite yet; on an ONNX "
                          f"input choose from {', '.join(onnx)} (or pass the HF model)")
    return list(asked) if asked is not None else onnx


class HeldOut:
    """What the search's refine loop measures a plan on: next-token KL on held-out calibration
    windows (and on windows of the validation length, not profiled, when attention is profiled)
    and, weighted, the KL at the answers of held-out retrieval sequences of that length."""

    def __init__(self, module, graph: TransformerGraph, cal: Calibration):
        self.cal, self.is_lm = cal, graph.task == "causal-lm"
        self.texts = [t for t in (cal.heldout_ids, cal.heldout_long_ids) if t is not None]
        self.reference = [model_outputs(module, t) for t in self.texts]
        self.retrieval = [s.ids for s in cal.heldout_retrieval]
        self.ret_reference = self._answers(module)

    def _answers(self, model) -> list[torch.Tensor]:
        run = as_runnable(model)
        with torch.no_grad():
            return [run(ids[None]).float()[:, s.answer_start - 1:-1]
                    for ids, s in zip(self.retrieval, self.cal.heldout_retrieval)]

    def divergence(self, model) -> float:
        """Text KL (the mean over the calibration length and the validation length) and the
        retrieval answers' KL, weighted."""
        kl = float(np.mean([divergence(ref, model_outputs(model, t), self.is_lm)
                            for ref, t in zip(self.reference, self.texts)]))
        if not self.retrieval:
            return kl
        w = self.cal.retrieval_weight
        return (1 - w) * kl + w * divergence(self.ret_reference, self._answers(model), self.is_lm)


def _tokenizer_dir(source: TorchSource | OnnxSource, tokenizer) -> Path | None:
    """The tokenizer: given, or beside the model (its HF directory, or the .onnx file's folder)."""
    if tokenizer:
        return Path(tokenizer)
    return source.path.parent if isinstance(source, OnnxSource) else source.path


def _input_len(ids) -> int | str:
    """The calibration windows' length, or "lines" where every input is a whole line."""
    return "lines" if isinstance(ids, Lines) else int(ids.shape[1])


def calibration_windows(windows: int | None, length: int, tokens: int = CALIB_TOKENS) -> int:
    """Windows given, or enough for `tokens` tokens (at least 16): the least-squares refits
    of pruned FFNs and heads have as many unknowns per output as the layer is wide, and 64
    windows of 32 tokens (2048 tokens for MiniLM's 1536-wide FFN) fitted the calibration text,
    not the sentences after it (embedding cosine at 0.75: 0.925 with 2048 tokens, 0.946 with 8192)."""
    return windows if windows is not None else max(16, -(-tokens // length))


def _calibration(module, graph, source: TorchSource | OnnxSource, calib, tokenizer, windows: int | None,
                 length: int | None, seed: int) -> Calibration:
    """Calibration windows; `length` None: DEFAULT_CALIB_LEN tokens, or for an encoder given text,
    its lines whole (windows × their median length tokens of them, by default ENCODER_CALIB_TOKENS)."""
    if calib is not None and Path(calib).suffix != ".json":
        tok_dir = _tokenizer_dir(source, tokenizer)
        if tok_dir is None:
            raise TailorError("--calib needs a tokenizer: pass --tokenizer DIR (the model came in as a "
                              "module)")
        encoder = graph.task == "encoder"
        tokens = ENCODER_CALIB_TOKENS if encoder else CALIB_TOKENS
        return calibration_from_text(read_text_pieces(Path(calib)), load_tokenizer(tok_dir), length,
                                     lambda n: calibration_windows(windows, n, tokens), str(calib),
                                     per_line=encoder)
    length = length or DEFAULT_CALIB_LEN
    windows = calibration_windows(windows, length)
    if calib is None:
        return calibration_data_free(module, graph.vocab_size, length, windows, seed)
    return calibration_from_ids(Path(calib), graph.vocab_size, length, windows)  # no tokenizer needed


def load(folder: str | Path, runtime: str | None = None) -> Compiled:
    """Load an artifact written by Compiled.save(); verifies every file's sha256 first.
    runtime "tvm" runs its TVM build (format tvm); otherwise its model runs in PyTorch
    (safetensors) or onnxruntime (model.onnx)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TailorError(f"{folder}: no such artifact directory")
    files = verify_artifact(folder)
    if runtime not in (None, "tvm"):
        raise TailorError(f"unknown runtime {runtime!r}; leave it out, or 'tvm'")
    if runtime == "tvm" and "tvm.json" not in files:
        raise TailorError(f"{folder}: the artifact holds no TVM build (compile with format tvm)")
    plan = Plan.load(folder / "plan.json")
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise TailorError(f"{folder}/report.json: unreadable") from None
    if runtime == "tvm":
        from tailor.codegen.tvm.module import TvmModel

        model: torch.nn.Module = TvmModel(folder)
    elif BASE_CONFIG in files and plan.rewrites:
        model = HFModel(load_rewritten(folder, plan))
    elif "model.safetensors" in files or "model.safetensors.index.json" in files:
        model = HFModel(load_hf_directory(folder))
    elif "model.onnx" in files:
        model = OrtModel(folder / "model.onnx")
    else:
        raise TailorError(f"{folder}: the artifact holds no model (model.safetensors or model.onnx)")
    return Compiled(model, plan, report)


def load_rewritten(folder: Path, plan: Plan) -> torch.nn.Module:
    """Rebuild a rewritten model: the original architecture from base_config.json, the plan's
    structural edits (shapes only), then the weights from safetensors (strictly)."""
    import transformers
    from safetensors.torch import load_file

    cfg = json.loads((folder / BASE_CONFIG).read_text())
    if cfg.get("auto_map"):
        raise TailorError(f"{folder}/{BASE_CONFIG}: remote code is not loaded")
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise TailorError(f"{folder}/{BASE_CONFIG}: unknown architecture {arch!r}")
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "model_type"},
                                              model_type=cfg["model_type"])
    model = cls(config).eval()
    graph = capture(model).graph
    apply_options(model, graph, options_from_plan(graph, plan.rewrites, f"{folder}/plan.json"), None)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {graph.lm_head.weight.name} if graph.lm_head is not None and graph.tied_embeddings else set()
    if unexpected or set(missing) - tied:
        raise TailorError(f"{folder}: weights do not match the plan's structure "
                          f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if tied:
        model.tie_weights()
    return model


def describe(graph: TransformerGraph, workload: Workload) -> dict[str, Any]:
    """What `tailor inspect` shows: structure, parameters and FLOPs per block."""
    from tailor.passes.cost import attention_flops, ffn_flops

    return {
        "backend": graph.backend, "task": graph.task, "layers": graph.num_layers,
        "hidden_size": graph.hidden_size, "vocab_size": graph.vocab_size,
        "positional": graph.positional, "tied_embeddings": graph.tied_embeddings,
        "params": graph.params, "workload": {"batch": workload.batch, "prompt_len": workload.prompt_len,
                                             "gen_len": workload.gen_len},
        "flops": model_flops(graph, workload),
        "blocks": [{
            "layer": b.index, "heads": b.attn.num_heads, "kv_heads": b.attn.num_kv_heads,
            "head_dim": b.attn.head_dim, "rope": b.attn.rope, "causal": b.attn.causal,
            "attention_op": b.attn.kind, "ffn": b.ffn.kind, "activation": b.ffn.activation,
            "ffn_width": b.ffn.width, "norm": "/".join(sorted({n.kind for n in b.norms})),
            "residual": b.residual, "params": b.params,
            "attn_flops": attention_flops(b.attn, workload), "ffn_flops": ffn_flops(b.ffn, workload),
        } for b in graph.blocks],
    }


def _resolve_formats(formats, cap: Captured) -> tuple[str, ...]:
    if "tvm" in (formats or ()) and importlib.util.find_spec("tvm") is None:
        raise TailorError("format tvm needs Apache TVM: pip install 'apache-tvm==0.27.0.post1' "
                          "(the tailor[tvm] extra)")
    if isinstance(cap.source, OnnxSource):
        if formats and set(formats) - {"onnx", "tvm"}:
            raise TailorError("an ONNX input can only produce an ONNX artifact (--format onnx or onnx,tvm)")
        return ("onnx", "tvm") if "tvm" in (formats or ()) else ("onnx",)
    formats = tuple(formats or ("safetensors",))
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise TailorError(f"unknown format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    if "tvm" in formats and "onnx" not in formats:
        formats = formats + ("onnx",)
    return formats


def reference_outputs(model: torch.nn.Module, vocab: int, seq_len: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Sample token ids and the model's outputs on them, for validation."""
    ids = example_input_ids(vocab, seq_len, batch=1, seed=1)
    with torch.no_grad():
        return ids.numpy(), model(ids).float().numpy()


class StageLog:
    """Times pipeline stages. The CLI passes `status` (a spinner while a stage runs) and
    `on_done` (one line per finished stage)."""

    def __init__(self, on_done=None, status=None):
        self.times: dict[str, float] = {}
        self.on_done = on_done
        self.status = status

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        with self.status(name) if self.status else contextlib.nullcontext():
            yield
        self.times[name] = round(time.perf_counter() - t0, 3)
        if self.on_done:
            self.on_done(name, self.times[name])
