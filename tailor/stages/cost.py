"""The cost model of a compile: for `target`, and where the target is a table measured on this
machine, fitted to this model timed here (CostModel.fit_to_measured)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict

import torch

from tailor.backends.base import Backend
from tailor.backends.runners import OrtModel
from tailor.core.cache import cache_dir
from tailor.core.errors import TailorError
from tailor.core.patterns import Pattern
from tailor.core.targets import get_target
from tailor.passes.attn_pattern import default_grid
from tailor.passes.cost import CostModel, Structure, Workload
from tailor.passes.int8 import int8_refusal
from tailor.passes.registry import PASSES, apply_options, takes
from tailor.passes.search import structure_of
from tailor.quality.metrics import time_side_by_side
from tailor.rewriter.capture import Captured, OnnxSource
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.onnx_sparse_attention import blocked_keys

# calls of each fit variant timed (after as many warm-up calls): three runs of refllama-16m's
# fit at 20 gave its half-width variant 0.810, 0.822 and 0.829 of the dense model
FIT_REPEATS = 30
# the name under which the fit times the dense model against the ONNX input as given: its
# lossless clean-ups, and the graph as tailor writes it, move its time (the cost model's baseline;
# timed even where nothing was cleaned up: MiniLM's Optimum export, which has none, runs ~2%
# slower as tailor holds it, with the intermediate shapes its inference writes (value_info), and
# its plans measured over their price while that went unpriced)
CLEAN_UP = "clean_up"
# an ONNX model's attention profile runs the whole model per (layer, KV head, pattern): offered
# by default only where patterns can pay for it (MiniLM at 128 tokens: 7%, refllama-16m at 512: 22%)
MIN_PATTERN_HEADROOM = 0.10


def clean_ups(cap: Captured) -> dict[str, int]:
    """The lossless clean-ups capture made to an ONNX input (tailor.rewriter.cleanup)."""
    return cap.source.cleaned if isinstance(cap.source, OnnxSource) else {}


def cost_model_for(cap: Captured, dense: Backend, workload: Workload, target: str, *, fit: bool = True,
                   use_cache: bool = True, int8: bool = True, formats: tuple[str, ...] = (),
                   progress: bool = False) -> CostModel:
    """The cost model for `target`; for a table measured on this machine, fitted to this model
    here (CostModel.fit_to_measured): the dense model and the variants of `fit_variants` timed
    side by side (an all-INT8 one where `int8`, the pass asked for, can run into `formats`). The
    measured ratios are cached (keyed by the model, the table and the workload) so that compiling
    again reaches the same plan."""
    cost_model = CostModel(cap.graph, workload, get_target(target), graph_kv_cache=dense.graph_kv_cache)
    if not fit or not cost_model.target.matmul_rates or workload.gen_len:
        return cost_model
    graph = cap.graph
    variants = fit_variants(graph, workload, int8=int8 and int8_refusal(dense, cost_model, formats) is None)
    if "int8_all" in variants:  # less an LM head the model holds in a form INT8 does not run
        variants["int8_all"] = [o for o in variants["int8_all"] if takes(dense, o)]
    if not variants:
        cost_model.fit_skipped = "neither the FFNs nor the heads of this model can be sliced"
        return cost_model
    key = hashlib.sha256(json.dumps({"model": cap.model_hash, "target": asdict(cost_model.target),
                                     "workload": asdict(workload),
                                     # what each variant changes, not only its name (int8_all took
                                     # in the LM head: ratios timed without it are another variant's)
                                     "variants": {n: sorted(o.key for o in v) for n, v in variants.items()}},
                                    sort_keys=True).encode()).hexdigest()[:24]
    cached = cache_dir() / "fits" / f"{key}.json"
    timed = set(variants) | ({CLEAN_UP} if isinstance(cap.source, OnnxSource) else set())
    ratios = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        if use_cache:
            entry = json.loads(cached.read_text())
            ratios = {name: float(r) for name, r in entry["ratios"].items()}
            left_out = {name: str(why) for name, why in entry["left_out"].items()}
            if set(ratios) | set(left_out) != timed or not all(0 < r < 10 for r in ratios.values()):
                ratios = None
    if ratios is None:
        ratios, left_out = _time_variants(cap, dense, variants, workload, progress)
        if use_cache:
            with contextlib.suppress(OSError):
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"ratios": ratios, "left_out": left_out}))
                os.replace(tmp, cached)
    # a variant the rewrites cannot build leaves its parts at the roofline's price (the search
    # cannot choose what it would have measured either); none built: priced unfitted, the report says why
    cost_model.fit_left_out = left_out
    if set(left_out) == set(variants):
        cost_model.fit_skipped = "; ".join(f"the variant {n} could not be built: {why}"
                                           for n, why in left_out.items())
        return cost_model
    cost_model.fit_to_measured({n: (structure_of(graph, o), ratios[n]) for n, o in variants.items()
                                if n in ratios})
    cost_model.baseline = ratios.get(CLEAN_UP, 1.0)
    return cost_model


def _time_variants(cap: Captured, dense: Backend, variants: dict[str, list], workload: Workload,
                   progress: bool = False) -> tuple[dict[str, float], dict[str, str]]:
    """Each variant's latency / the dense model's, all timed side by side, and for an ONNX input
    the dense model's / the input's as given (CLEAN_UP); beside them, why each variant that could
    not be built was left out."""
    runnables, left_out = {"original": dense.runnable()}, {}
    if isinstance(cap.source, OnnxSource):
        runnables["input"] = OrtModel(cap.source.path)
    for name, options in variants.items():
        try:
            runnables[name] = apply_options(dense.clone(), options, None).runnable()
        except TailorError as e:
            left_out[name] = str(e)
    if len(left_out) == len(variants):
        return {}, left_out
    t = time_on_workload(runnables, cap.graph, workload, repeats=FIT_REPEATS,
                         progress="timing the cost fit's variants" if progress else None)
    ratios = {name: t[name] / t["original"] for name in variants if name not in left_out}
    return ratios | ({CLEAN_UP: t["original"] / t["input"]} if "input" in t else {}), left_out


def fit_variants(graph: TransformerGraph, workload: Workload, int8: bool = False) -> dict[str, list]:
    """The structures the cost model is fitted on, as options (shapes only: the timing does not
    depend on the weights): every FFN at half width; every attention with half its query heads
    (half its KV heads where each KV head serves one query head); on an ONNX graph whose attention
    is decomposed, every KV head on the default grid's narrowest pattern, and on its widest that
    keeps at most half the keys (block-sparse ops: what they cost whatever the pattern, and per
    key); with `int8` (the model's projections can run INT8 and the target prices them), every
    branch INT8. A layer that cannot be sliced stays whole; a variant no layer can take is left out."""
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
    int8_all = PASSES["int8"].candidates(graph, None) if int8 else []
    return {name: options for name, options in (("ffn_half", ffn), ("heads_half", heads),
                                                ("patterns_narrowest", narrow_all),
                                                ("patterns_wide", wide_all if wide != narrow else []),
                                                ("int8_all", int8_all))
            if options}


def time_on_workload(models: dict, graph: TransformerGraph, workload: Workload,
                     repeats: int = 20, progress: str | None = None) -> dict[str, float]:
    """Median seconds of each model on the workload's prompt, timed in turn after warm-up calls:
    20 each where onnxruntime runs one (its first dozens of calls run ~10% slower), else 3 (a
    135M torch model's call is ~1 s on two cores, and 17 more warm-ups of each fit variant were
    a minute of its compile)."""
    ids = torch.randint(0, graph.vocab_size, (workload.batch, workload.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    warmup = 20 if any(isinstance(m, OrtModel) for m in models.values()) else 3
    # the head on the last position where the cost model prices it so
    return time_side_by_side(models, ids, repeats=repeats, warmup=warmup, progress=progress,
                             last_logits=workload.last_logits)


def pattern_headroom(cost_model: CostModel, graph: TransformerGraph, grid: list[Pattern],
                     objective: str) -> float:
    """The share of the objective saved with every KV head on the grid's cheapest pattern."""
    n = cost_model.workload.prompt_len
    narrowest = min(grid, key=lambda p: blocked_keys(p, n, graph.blocks[0].attn.causal))
    sparse = Structure.dense(graph)
    for shape in sparse.layers:
        shape.kv_patterns = (narrowest,) * shape.kv_groups
    return 1.0 - cost_model.ratio(sparse, objective)


def measured_latency(cap: Captured, dense: Backend, rewritten: Backend,
                     workload: Workload, progress: bool = False) -> dict[str, float]:
    """The rewritten model timed beside the input as given (an ONNX file before its clean-ups)."""
    given = OrtModel(cap.source.path) if isinstance(cap.source, OnnxSource) else dense.runnable()
    t = time_on_workload({"original": given, "rewritten": rewritten.runnable()}, cap.graph, workload,
                         progress="timing the result beside the original" if progress else None)
    return {"ratio": t["rewritten"] / t["original"], "original_ms": t["original"] * 1e3,
            "rewritten_ms": t["rewritten"] * 1e3}
