"""The command line: `optimize` (the main job) and `tailor {optimize,inspect,eval,bench}`.

Bad input prints one line on stderr and exits 2; --debug shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import tomllib
import yaml
from rich.console import Console
from rich.table import Table

from tailor.core.errors import TailorError
from tailor.core.plan import OBJECTIVES, check_budget
from tailor.data.retrieval import RetrievalTemplate, form_name

# piped output gets a fixed wide layout instead of rich's 80-column default
console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)

# keys a --config file may set, with their defaults; CLI flags given explicitly win
OPTIMIZE_DEFAULTS: dict[str, Any] = {
    "model": None, "budget": 1.0, "output": None, "objective": "latency", "prompt_len": None,
    "gen_len": 0, "batch": None, "target": "h100", "passes": None, "calib": None, "tokenizer": None,
    "calib_windows": None, "calib_len": None, "eval": None, "seed": 0, "format": None,
    "force": False, "trust_remote_code": False, "sweep": None, "attn_lengths": None,
    "validation_len": None, "retrieval_template": None, "plan": None, "device": "auto", "dtype": "auto",
    "max_memory": None, "hf_compatible": False, "tune_trials": 0,
}


class ValidationFailed(Exception):
    """The written artifact does not reproduce the model; nothing was moved into place."""


# ---- argument parsing ------------------------------------------------------------------------

def _optimize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="an .onnx file, a .gguf file (dequantized to --dtype) or "
                   "an HF model directory (default: the embedded all-MiniLM-L6-v2, exported to ONNX)")
    p.add_argument("--budget", type=str, help="cost of the result as a fraction of the original, "
                   "in (0, 1] (default 1.0)")
    p.add_argument("-o", "--output", help="artifact directory (default: <model name>-tailored)")
    p.add_argument("--objective", choices=list(OBJECTIVES),
                   help="what the budget limits (default latency)")
    p.add_argument("--prompt-len", "--seq-len", dest="prompt_len", type=int,
                   help="workload prompt length the cost is measured for (default 1024, or the "
                   "length an ONNX graph is exported with)")
    p.add_argument("--gen-len", type=int, help="workload generated tokens (default 0)")
    p.add_argument("--batch", type=int, help="workload batch size (default 1, or the batch an ONNX "
                   "graph is exported with)")
    p.add_argument("--target", help="hardware the cost model prices for: cpu, a100, h100 (default) "
                   "or h200 (vendor peaks), or a table measured here by `tailor calibrate-target` (.json)")
    p.add_argument("--device", help="where a torch model is compiled and stays: auto (a CUDA GPU when "
                   "there is one), cpu, cuda or cuda:N (ONNX models run on onnxruntime's CPU)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="precision of a torch model: auto (the checkpoint's on a GPU, float32 on the CPU)")
    p.add_argument("--max-memory", help="memory the weights may take on each device, as "
                   "0=70GiB,1=70GiB,cpu=100GiB: the model is loaded through accelerate (device_map auto), "
                   "its layers filling the GPUs in order and the rest offloaded to host memory (default: "
                   "so only where the weights do not fit the GPU)")
    p.add_argument("--passes", help="comma list of rewrite passes the search may use "
                   "(default all: layer_skip,ffn_skip,ffn_prune,head_prune,kv_share,attn_pattern, and "
                   "int8 on a CPU table from calibrate-target: ONNX models, float32 torch models on "
                   "the CPU)")
    p.add_argument("--attn-lengths", help="comma list of lengths attention patterns are profiled at "
                   "(default prompt-len/2,prompt-len)")
    p.add_argument("--validation-len", type=int, help="length plans are validated at, with held-out "
                   "text and retrieval sequences (default 3/4 prompt-len)")
    p.add_argument("--calib", help="calibration text file (default: data-free, sampled from the model)")
    p.add_argument("--tokenizer", help="tokenizer directory (or .gguf file) for --calib/--eval "
                   "(default: the model's)")
    p.add_argument("--calib-windows", type=int, help="calibration windows (default: 8192 tokens' "
                   "worth, at least 16; an encoder's lines: windows × their median length tokens of "
                   "lines, default 16384 tokens)")
    p.add_argument("--calib-len", type=int, help="tokens per calibration window (default 512; an "
                   "encoder given text calibrates on its lines whole unless this is given)")
    p.add_argument("--eval", help="text file to report perplexity / KL / top-1 on (never calibrated on)")
    p.add_argument("--seed", type=int, help="seed for data-free calibration (default 0)")
    p.add_argument("--plan", help="replay this plan.json (from an artifact made for the same model) "
                   "instead of searching; its budget, objective and workload apply")
    p.add_argument("--sweep", help="comma list of budgets: one artifact each under OUT, plus "
                   "OUT/pareto.png (quality vs budget beside single-technique plans)")
    p.add_argument("--format", help="comma list of safetensors,onnx,tvm,hf (torch inputs; default "
                   "safetensors); ONNX inputs always give ONNX, and a TVM CPU build with tvm "
                   "(for batch × prompt-len inputs); hf: a standard transformers checkpoint in OUT/hf "
                   "(AutoModelForCausalLM.from_pretrained, vLLM, SGLang, TGI), refused for plans a "
                   "standard config cannot say")
    p.add_argument("--tune-trials", type=int, help="MetaSchedule samples for the TVM build's heavy "
                   "kernels, in all (default 0: tailor's hand schedules only); the records are kept "
                   "in OUT/tvm-tune.json and reused when the artifact is written again (--force)")
    p.add_argument("--hf-compatible", action="store_true", default=None,
                   help="search only plans a standard transformers config can say (whole layers "
                   "removed, one FFN width, one head count) and write them with --format hf (added "
                   "by default); the unrestricted plan is measured too, and the report compares them")
    p.add_argument("--config", help="TOML or YAML file of these options (an artifact's run.yaml "
                   "replays its run)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done; write nothing")
    p.add_argument("--force", action="store_true", default=None, help="replace an existing output")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow an HF config that asks for remote code")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the recognised structure")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailor", description="Compile a transformer to a cost budget.")
    sub = parser.add_subparsers(dest="command", required=True)
    _optimize_args(sub.add_parser("optimize", help="compile a model to a budget and write an artifact"))
    p = sub.add_parser("inspect", help="print the recognised structure of a model")
    p.add_argument("model", help="an .onnx file, a .gguf file or an HF model directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length for FLOP counts")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("eval", help="quality of an artifact: perplexity, and KL/top-1 vs a reference; "
                       "retrieval exact match with --probe retrieval")
    p.add_argument("artifact")
    p.add_argument("--text", help="UTF-8 text file to evaluate on")
    p.add_argument("--probe", choices=["retrieval"], help="synthetic long-range retrieval (key = value "
                   "lines, then a query): exact match per length")
    p.add_argument("--lengths", default="512,1024,1500", help="context lengths of the probe")
    p.add_argument("--samples", type=int, default=32, help="probe sequences per length")
    p.add_argument("--reference", help="the original model (HF directory, .gguf or .onnx)")
    p.add_argument("--tokenizer", help="tokenizer directory or .gguf file (default: the artifact's own)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("calibrate-target", help="measure this CPU's matrix-product and memory "
                       "throughput with onnxruntime: a target table for --target FILE")
    p.add_argument("-o", "--out", required=True, help="the table to write (.json)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: the usable cores)")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("bench", help="latency of an artifact beside its reference, in one run")
    p.add_argument("artifact")
    p.add_argument("--reference", required=True, help="the original model (HF directory, .gguf or .onnx)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--runtime", choices=["tvm"], help="run the artifact's TVM build (default: "
                   "PyTorch for safetensors, onnxruntime for ONNX)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--debug", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(COMMANDS[args.command], args)


def optimize_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optimize", description="Compile a model to a cost budget.")
    _optimize_args(parser)
    return _run(cmd_optimize, parser.parse_args(argv))


def _run(fn, args) -> int:
    try:
        return fn(args) or 0
    except TailorError as e:
        if getattr(args, "debug", False):
            raise
        err.print(f"error: {e}", markup=False, soft_wrap=True)
        return 2
    except ValidationFailed as e:
        err.print(f"error: {e}", markup=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        return 130


# ---- optimize ----------------------------------------------------------------------------------

def resolve_config(args) -> dict[str, Any]:
    """Defaults < --config file < flags given on the command line."""
    cfg = dict(OPTIMIZE_DEFAULTS)
    if args.config:
        cfg.update(read_config(Path(args.config)))
    for key in OPTIMIZE_DEFAULTS:
        val = getattr(args, key, None)
        if val is not None:
            cfg[key] = val
    for key in ("format", "passes", "attn_lengths"):
        if isinstance(cfg[key], str):
            cfg[key] = [f.strip() for f in cfg[key].split(",") if f.strip()]
    if cfg["attn_lengths"] is not None:
        cfg["attn_lengths"] = _positive_ints(cfg["attn_lengths"], "--attn-lengths")
    if cfg["retrieval_template"] is not None and not isinstance(cfg["retrieval_template"], dict):
        raise TailorError("retrieval_template (config file) is a mapping: line, query, answer, max_value, "
                          "context")
    return cfg


def _positive_ints(values, flag: str) -> list[int]:
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError):
        raise TailorError(f"{flag} takes positive whole numbers, got {values!r}") from None
    if not out or min(out) < 1:
        raise TailorError(f"{flag} takes positive whole numbers, got {values!r}")
    return out


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TailorError(f"{path}: no such config file")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise TailorError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'} "
                          f"({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise TailorError(f"{path}: a config is a mapping of option names to values")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(OPTIMIZE_DEFAULTS))
    if unknown:
        raise TailorError(f"{path}: unknown option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(OPTIMIZE_DEFAULTS)}")
    return data


def cmd_optimize(args) -> int:
    from tailor.runtime.artifact import check_output_dir, output_lock

    cfg = resolve_config(args)
    cfg["budget"] = check_budget(cfg["budget"])
    from tailor.core.devices import resolve_device, resolve_dtype
    from tailor.core.dispatch import resolve_max_memory

    # before anything is read or written: a device this machine lacks, a dtype it cannot run,
    # memory sizes that are none
    resolve_dtype("float32" if cfg["dtype"] == "auto" else cfg["dtype"], resolve_device(cfg["device"]))
    resolve_max_memory(cfg["max_memory"])
    model = cfg["model"]
    if model is None:
        from tailor.cli.default_model import default_calibration, minilm_onnx
        model = str(minilm_onnx(log=lambda m: console.print(f"[dim]{m}[/dim]")))
        cfg["model"] = model
        if cfg["calib"] is None and cfg["budget"] < 1.0:
            cfg["calib"] = str(default_calibration())
            console.print(f"[dim]calibrating on {cfg['calib']} (English sentences from the docstrings "
                          f"of standard-library modules)[/dim]")
    if not Path(model).exists():
        raise TailorError(f"{model}: no such file or directory")
    out = Path(cfg["output"] or f"{Path(model).resolve().with_suffix('').name}-tailored")
    cfg["output"] = str(out)
    if cfg["sweep"] and cfg["plan"]:
        raise TailorError("--sweep searches a plan per budget; it cannot be combined with --plan")
    if args.dry_run:
        _optimize_one(cfg, model, out, cfg["budget"], dry_run=True, verbose=args.verbose)
        return 0
    with output_lock(out):  # from the first check to the rename: no second run races this one
        check_output_dir(out, bool(cfg["force"]))
        if cfg["sweep"]:
            return _sweep(cfg, model, out)
        _optimize_one(cfg, model, out, cfg["budget"], verbose=args.verbose)
    return 0


def _optimize_one(cfg: dict, model: str, out: Path, budget: float, *, dry_run: bool = False,
                  verbose: bool = False):
    """One compile + validated artifact; returns the Compiled (None on a dry run)."""
    import torch

    import tailor
    from tailor.backends.hf_checkpoint import HF_DIR
    from tailor.core.devices import DTYPES, tolerance
    from tailor.quality.validate import Check, as_json, check_onnx, compare_outputs
    from tailor.rewriter.capture import load_hf_directory
    from tailor.stages.artifact import reference_outputs
    from tailor.stages.log import StageLog

    def stage_done(name, secs, memory):
        gpu, each = memory["peak_gpu_gib"], memory.get("peak_gpu_gib_each")
        console.print(f"  {name:<9} {secs:7.2f} s   peak host {memory['peak_host_gib']:.2f} GiB"
                      + (f", GPU {gpu:.2f} GiB" if gpu is not None else "")
                      + (" (" + " + ".join(f"{g:.2f}" for g in each) + ")" if each else ""))

    stages = StageLog(stage_done, status=lambda name: console.status(f"{name}…"))
    what = f"replaying {cfg['plan']}" if cfg["plan"] else f"budget {budget:g}, objective {cfg['objective']}"
    console.print(f"tailor: {model} → {out} ({what})")
    compiled = tailor.compile(model, budget, objective=cfg["objective"], prompt_len=cfg["prompt_len"],
                              gen_len=cfg["gen_len"], batch=cfg["batch"], target=cfg["target"],
                              passes=cfg["passes"], calib=cfg["calib"], tokenizer=cfg["tokenizer"],
                              calib_windows=cfg["calib_windows"], calib_len=cfg["calib_len"],
                              eval_text=cfg["eval"], seed=cfg["seed"], formats=cfg["format"],
                              trust_remote_code=bool(cfg["trust_remote_code"]), progress=True,
                              attn_lengths=cfg["attn_lengths"], validation_len=cfg["validation_len"],
                              retrieval_template=cfg["retrieval_template"], plan=cfg["plan"],
                              device=cfg["device"], dtype=cfg["dtype"], max_memory=cfg["max_memory"],
                              hf_compatible=bool(cfg["hf_compatible"]), tune_trials=cfg["tune_trials"],
                              stages=stages)
    if dry_run or verbose:
        print_structure(compiled.report["model"])
    if dry_run:
        console.print(f"dry run: would write {out}/ with plan.json, report.json, run.yaml, "
                      f"{', '.join(compiled.formats)} model, manifest.json "
                      f"({len(compiled.plan.rewrites)} rewrites); nothing written")
        return None

    compiled.run_config = {k: v for k, v in cfg.items() if k not in ("force", "sweep")} | {"budget": budget}
    ids, expected = reference_outputs(compiled.model, compiled.graph.vocab_size)
    checks: list = []

    def validate(tmp: Path) -> None:
        # the artifact must reproduce the compiled model (the input itself at budget 1.0); how far
        # a rewritten model is from the original is quality, measured in the search and --eval
        placed = compiled.report["model"]
        # a model spread over devices is reloaded spread again, as it was loaded
        device = "auto" if "device_map" in placed else placed["device"]
        reloaded = tailor.load(tmp, device=device, dtype=placed["dtype"], max_memory=cfg["max_memory"]) \
            if placed["dtype"] in DTYPES else tailor.load(tmp)
        with torch.no_grad():
            got = reloaded.model(torch.from_numpy(ids)).float().cpu().numpy()
        if (tmp / "model.onnx").is_file():
            checks.append(check_onnx(tmp / "model.onnx"))
        atol = tolerance(DTYPES.get(placed["dtype"], torch.float32))
        checks.extend(compare_outputs(expected, got, atol))
        if (tmp / HF_DIR).is_dir():  # the standard checkpoint, as transformers alone loads it
            standard = load_hf_directory(tmp / HF_DIR, device=device, dtype=placed["dtype"],
                                         max_memory=cfg["max_memory"])
            with torch.no_grad():
                got = standard(torch.from_numpy(ids).to(standard.device)).logits.float().cpu().numpy()
            checks.extend(Check(f"hf_{c.name}", c.ok, f"{HF_DIR}/ (AutoModelForCausalLM): {c.detail}")
                          for c in compare_outputs(expected, got, atol))
        if (tmp / "tvm.json").is_file():  # the build checked itself against onnxruntime
            t = json.loads((tmp / "tvm.json").read_text())
            checks.append(Check("tvm", True, f"TVM build ({t['target']}, {t['shape'][0]} × {t['shape'][1]} "
                                f"tokens) matches onnxruntime: max abs diff "
                                f"{t['max_abs_diff_vs_onnxruntime']:.3g} ≤ {t['tolerance']:.3g}"))
        for c in checks:
            console.print(f"  {c.line()}", style="green" if c.ok else "red")
        if not all(c.ok for c in checks):
            raise ValidationFailed(f"the written model does not reproduce the compiled one; "
                                   f"{out} was not written")
        report = json.loads((tmp / "report.json").read_text())
        report["validation"] = as_json(checks)
        report["stages"] = stages.to_json()
        _rewrite_json(tmp, "report.json", report)

    with stages("write"):
        compiled.save(out, force=bool(cfg["force"]), check=validate)
    compiled.report["validation"] = [c.__dict__ for c in checks]
    print_summary(compiled, out)
    return compiled


def _sweep(cfg: dict, model: str, out: Path) -> int:
    """One artifact per budget under OUT (the profile is computed once and cached), then
    OUT/sweep.json and OUT/pareto.png: quality vs budget for tailor and for the plan each pass
    reaches alone (measured by the search)."""
    from tailor.quality.plots import pareto_plot

    budgets = sorted({float(b) for b in str(cfg["sweep"]).split(",")}, reverse=True)
    for b in budgets:
        check_budget(b)
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for b in budgets:
        compiled = _optimize_one(cfg, model, out / f"budget-{b:g}", b)
        search = compiled.report.get("search", {})
        quality = compiled.report.get("quality", {})
        points.append({"budget": b, "method": "tailor", "kl_heldout": search.get("measured_kl_heldout"),
                       "perplexity": quality.get("perplexity"), "kl_eval": quality.get("kl_to_reference")})
        for it in search.get("iterations", []):
            if isinstance(it["iteration"], str):  # "<pass> only" or a published method's plan
                points.append({"budget": b, "method": it["iteration"], "kl_heldout": it["measured_kl"]})
    (out / "sweep.json").write_text(json.dumps(points, indent=2) + "\n")
    pareto_plot(points, out / "pareto.png", "kl_heldout")
    console.print(f"sweep: {out}/sweep.json, {out}/pareto.png")
    return 0


def _rewrite_json(folder: Path, name: str, data: dict) -> None:
    """Update a file inside a not-yet-published artifact and its manifest entry."""
    from tailor.runtime.artifact import MANIFEST, sha256_file

    (folder / name).write_text(json.dumps(data, indent=2, default=str) + "\n")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = sha256_file(folder / name)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


# held-out KL (nats per token) above which the summary warns: SmolLM2-135M's searched plans at
# 0.69 (latency 0.5 at 16K) and 0.95 (latency 0.5 at 4K) are unusable, while at kv_memory 0.5 a
# plan at KL 0.0055 on code-eval kept perplexity within 0.4% (docs/BENCHMARKS.md)
HIGH_KL = 0.1


def print_summary(compiled, out: Path) -> None:
    t = Table(title=f"tailor result → {out}", show_lines=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    plan = compiled.plan
    if not plan.rewrites:
        t.add_row("rewrites applied", "none (identity)")
    for r in plan.rewrites:
        t.add_row(r["pass"], f"{r['label']} (est. KL {r['estimated_kl']:.4f})")
    for obj, ratio in plan.predicted.items():
        t.add_row(f"predicted {obj} ratio", f"{ratio:.3f}" + (" ← budget" if obj == plan.objective else ""))
    cleaned = compiled.report.get("clean_ups")
    if cleaned:
        baseline = compiled.report["cost_model"]["baseline"]
        t.add_row("lossless clean-ups", ", ".join(f"{k} × {n}" for k, n in cleaned.items()) +
                  (f" (latency {baseline:.3f} of the input's, measured)" if baseline != 1.0 else ""))
    if compiled.report.get("int8"):
        t.add_row("INT8 branches", f"{len(compiled.report['int8']['branches'])} "
                  f"({compiled.report['int8']['method']})")
    if compiled.report.get("int8_skipped"):
        t.add_row("INT8 options", f"not offered: {compiled.report['int8_skipped']}")
    timed = compiled.report.get("measured_latency")
    if timed:
        t.add_row("measured latency ratio (here)",
                  f"{timed['ratio']:.3f} ({timed['original_ms']:.1f} → {timed['rewritten_ms']:.1f} ms)")
    search = compiled.report.get("search")
    refit = compiled.report.get("refit")
    if refit:
        before, after = refit["measured_kl_heldout_before"], refit["measured_kl_heldout_after"]
        t.add_row("KL to original (held-out calib)",
                  f"{refit['measured_kl_heldout']:.4f} (search's plan {before:.4f}, refitted in sequence "
                  f"{after:.4f}: {'kept' if refit['kept'] else 'not kept'})")
    elif search and search.get("measured_kl_heldout") is not None:
        t.add_row("KL to original (held-out calib)", f"{search['measured_kl_heldout']:.4f}")
    restricted = compiled.report.get("hf_compatible")
    if restricted:
        free, kl = restricted["unrestricted_measured_kl_heldout"], restricted["measured_kl_heldout"]
        t.add_row("--hf-compatible cost (held-out KL, before refit)",
                  f"{kl:.4f} vs {free:.4f} unrestricted" + (f" (×{kl / free:.2f})" if free > 0 else ""))
    measured = [it for it in (search or {}).get("iterations", []) if it.get("measured_kl") is not None]
    if measured:
        best = min(measured, key=lambda it: it["measured_kl"])
        source = best["iteration"] if isinstance(best["iteration"], str) else "the solver's"
        kept = ""
        if best.get("retrieval_answered") is not None:  # of the held-out sequences the dense model answers
            answered = compiled.report.get("calibration", {}).get("heldout_retrieval_answered")
            kept = (f"; it answers {best['retrieval_answered']} of the {answered} retrieval sequences the "
                    f"original does")
        t.add_row("plans measured whole", f"{len(measured)} (closest: {source} plan{kept})")
    cal = compiled.report.get("calibration", {})
    answered = cal.get("dense_answered")
    if answered:
        forms = cal.get("retrieval_forms")
        named = [form_name(RetrievalTemplate(**f)) for f in forms or []]
        shares = [f"{name} (answered {answered.get(name, 0.0):.0%} at ≤ 1K tokens)" for name in named]
        t.add_row("retrieval calibrated on",
                  "nothing: the model answered none of the forms" if not forms else
                  shares[0] + "".join(f"; checked also on {s}" for s in shares[1:])
                  + f"; held-out sequences answered: {cal.get('heldout_retrieval_answered')}")
    quality = compiled.report.get("quality")
    if quality:
        for k in ("perplexity", "reference_perplexity", "kl_to_reference", "top1_agreement",
                  "mean_cosine_to_reference"):
            if k in quality:
                t.add_row(f"{k} ({Path(quality['text']).name})", f"{quality[k]:.4f}")
    for c in compiled.report.get("validation", []):
        t.add_row(c["name"], ("✓ " if c["ok"] else "✗ ") + c["detail"])
    console.print(t)
    kl = (refit or search or {}).get("measured_kl_heldout")
    if kl is not None and kl > HIGH_KL:
        console.print(f"[yellow]warning: KL {kl:.3f} to the original on held-out calibration data: at "
                      f"this budget the model's predictions change a lot; a higher --budget or fewer "
                      f"passes may be the better trade[/yellow]")
    if answered and not cal.get("retrieval_forms"):
        console.print("[yellow]warning: the model answered none of the synthetic retrieval forms, so no "
                      "plan was checked for reading far back in the context: check the artifact on long "
                      "inputs of your own task[/yellow]")
    console.print(f"artifact {out}/: {', '.join(sorted(p.name for p in out.iterdir()))}")


# ---- inspect -----------------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from tailor.passes.cost import Workload
    from tailor.rewriter.capture import capture
    from tailor.stages.artifact import describe

    if args.seq_len < 1:
        raise TailorError("--seq-len must be positive")
    cap = capture(args.model, trust_remote_code=args.trust_remote_code)
    info = describe(cap.graph, Workload(prompt_len=args.seq_len))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_structure(info)
    return 0


def print_structure(info: dict) -> None:
    console.print(f"{info['task']} · {info['backend']} · {info['layers']} layers · hidden "
                  f"{info['hidden_size']} · vocab {info['vocab_size']} · positions {info['positional']}"
                  f" · {info['params'] / 1e6:.2f} M params · {info['flops'] / 1e9:.2f} GFLOP at "
                  f"{info['workload']['batch']}×{info['workload']['prompt_len']} tokens")
    t = Table()
    for col in ("layer", "heads", "kv heads", "head dim", "attention", "ffn", "ffn width", "norm",
                "params", "attn GFLOP", "ffn GFLOP"):
        t.add_column(col, justify="right")
    for b in info["blocks"]:
        attn = " ".join(["causal" if b["causal"] else "bidir"] + (["rope"] if b["rope"] else [])
                        + [b["attention_op"]])
        t.add_row(str(b["layer"]), str(b["heads"]), str(b["kv_heads"]), str(b["head_dim"]), attn,
                  f"{b['ffn']} {b['activation']}", str(b["ffn_width"]),
                  f"{b['norm']} {b['residual'].replace('_', '-')}", f"{b['params']:,}",
                  f"{b['attn_flops'] / 1e9:.3f}", f"{b['ffn_flops'] / 1e9:.3f}")
    console.print(t)


# ---- eval and bench ----------------------------------------------------------------------------

def cmd_eval(args) -> int:
    from tailor.evaluate import evaluate, probe_retrieval

    if args.text is None and args.probe is None:
        raise TailorError("eval needs --text FILE and/or --probe retrieval")
    result: dict[str, Any] = {}
    if args.text is not None:
        result.update(evaluate(Path(args.artifact), Path(args.text), reference=args.reference,
                               tokenizer=args.tokenizer, seq_len=args.seq_len, windows=args.windows))
    if args.probe == "retrieval":
        lengths = _positive_ints(args.lengths.split(","), "--lengths")
        result.update(probe_retrieval(Path(args.artifact), lengths, samples=args.samples,
                                      reference=args.reference, tokenizer=args.tokenizer))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        t = Table(title=f"quality of {args.artifact} on {args.text}")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k, v in result.items():
            t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        console.print(t)
    return 0


def cmd_bench(args) -> int:
    from tailor.evaluate import bench

    result = bench(Path(args.artifact), args.reference, seq_len=args.seq_len, batch=args.batch,
                   repeats=args.repeats, runtime=args.runtime)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console.print(f"reference {result['reference_ms']:.2f} ms · artifact {result['artifact_ms']:.2f} ms"
                      f" · ratio {result['ratio']:.3f} (median of {args.repeats}, interleaved, "
                      f"batch {args.batch} × {args.seq_len} tokens, this machine)")
    return 0


def cmd_calibrate_target(args) -> int:
    from tailor.core.targets import load_target_file
    from tailor.runtime.target_table import measure_cpu

    out = Path(args.out)
    if out.suffix != ".json":
        raise TailorError(f"{out}: the target table is JSON; name it *.json")
    if args.threads is not None and args.threads < 1:
        raise TailorError("--threads must be positive")
    if not out.parent.is_dir():
        raise TailorError(f"{out.parent}: no such directory")
    with console.status("timing matrix products and memory bandwidth with onnxruntime…"):
        table = measure_cpu(args.threads)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        load_target_file(tmp)  # what --target will read back
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    t = Table(title=f"{table['name']} → {out}")
    t.add_column("matrix product FLOPs", justify="right")
    t.add_column("achieved GFLOP/s", justify="right")
    t.add_column("INT8 weights, GFLOP/s", justify="right")
    for (flops, rate), (_, int8) in zip(table["matmul"], table["int8_matmul"]):
        t.add_row(f"{flops:.3g}", f"{rate / 1e9:.1f}", f"{int8 / 1e9:.1f}")
    console.print(t)
    console.print(f"memory bandwidth {table['bytes_per_s'] / 1e9:.1f} GB/s; use it with --target {out}")
    return 0


COMMANDS = {"optimize": cmd_optimize, "inspect": cmd_inspect, "eval": cmd_eval, "bench": cmd_bench,
            "calibrate-target": cmd_calibrate_target}


if __name__ == "__main__":
    sys.exit(main())
