"""INT8 in the one search for torch models on the CPU (issue 26): tailor's plans with the default
passes (the int8 pass on: PyTorch's dynamic quantization, tailor.rewriter.modules.int8_linear) and
with the same passes less int8, beside what a torch user does first, PyTorch's one-line
`torch.ao.quantization.quantize_dynamic` of the dense model (every nn.Linear, the LM head included;
per tensor, its default, and per channel). All run in PyTorch.

Models: refllama-16m from its HF folder (../shared/models), SmolLM2-135M-Instruct from its GGUF
(--smollm2 FILE). Objective latency at --prompt-len, target this CPU measured first (as
`tailor calibrate-target` does, INT8 figure included), calibration on code-calib.txt. Latency:
medians of alternating runs of every model in one process on 1 × prompt-len tokens, the head on
the last position only (as generation serves a model, and as tailor prices a torch causal LM),
torch on --threads threads. Quality on text no calibration reads: perplexity and KL to the dense model on
--eval-windows windows of code-eval.txt.

    python benchmarks/torch_int8_cpu.py [--models refllama,smollm2] [--smollm2 FILE]
        [--budgets 0.75,0.5] [--prompt-len 512] [--threads 2] [--repeats 30] [--out R.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import tailor
from benchmarks.cpu_onnx import REFLLAMA, SHARED
from tailor.backends.runners import HFModel
from tailor.data.text import load_tokenizer, read_text, token_windows
from tailor.passes.registry import PASSES
from tailor.quality.metrics import lm_metrics, time_side_by_side
from tailor.rewriter.capture import load_gguf, load_hf_directory
from tailor.runtime.target_table import measure_cpu

CALIB, EVAL = SHARED / "data" / "code-calib.txt", SHARED / "data" / "code-eval.txt"


def torch_one_liners(dense: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """PyTorch's own dynamic quantization of the whole dense model, as a user would call it."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return {"torch quantize_dynamic, per tensor": quantize_dynamic(copy.deepcopy(dense), {torch.nn.Linear},
                                                                   dtype=torch.qint8),
            "torch quantize_dynamic, per channel": quantize_dynamic(
                copy.deepcopy(dense), {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)}


def run_model(name: str, source: str, dense: torch.nn.Module, budgets: list[float], prompt_len: int,
              target: str, repeats: int, eval_windows: int) -> list[dict]:
    models = {"original": HFModel(dense)}
    info: dict[str, dict] = {"original": {"method": "original", "budget": None, "predicted": 1.0}}
    for key, m in torch_one_liners(dense).items():
        models[key] = HFModel(m)
        info[key] = {"method": key, "budget": None, "predicted": None}
    for b in budgets:
        skipped: set[str] = set()
        for method in ("tailor + INT8", "tailor, no INT8"):
            passes = None
            if method == "tailor, no INT8":  # the passes the default compile searched, less int8
                passes = [p for p in PASSES if p not in skipped | {"int8"}]
            t0 = time.perf_counter()
            opt = tailor.compile(source, b, objective="latency", target=target, prompt_len=prompt_len,
                                 calib=str(CALIB), passes=passes, progress=True)
            if method == "tailor + INT8" and "attn_pattern_skipped" in opt.report:
                skipped = {"attn_pattern"}
            key = f"{method} {b:g}"
            models[key] = opt.model   # the rest of the compile (profile, backends) is dropped below
            rewrites = opt.plan.rewrites
            info[key] = {"method": method, "budget": b, "predicted": opt.plan.predicted["latency"],
                         "compile_s": round(time.perf_counter() - t0, 1), "rewrites": len(rewrites),
                         "passes": sorted({r["pass"] for r in rewrites}),
                         "int8_branches": sum(r["pass"] == "int8" for r in rewrites),
                         "int8_skipped": opt.report.get("int8_skipped"),
                         "kl_heldout": opt.report.get("search", {}).get("measured_kl_heldout")}
            print(json.dumps({"model": name, key: info[key]}), flush=True)
            del opt
    ids = torch.randint(0, dense.config.vocab_size, (1, prompt_len),
                        generator=torch.Generator().manual_seed(0))
    # served: the head on each prompt's last position only (logits_to_keep=1), as tailor prices it
    times = time_side_by_side(models, ids, repeats, warmup=5, last_logits=True)
    quality = window_quality(models, load_tokenizer(source), prompt_len, eval_windows)
    rows = []
    for k in models:
        rows.append({"model": name, "variant": k, **info[k], "measured": times[k] / times["original"],
                     "ms": times[k] * 1e3, **quality[k]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def window_quality(models: dict, tok, length: int, count: int) -> dict[str, dict]:
    """Perplexity and KL to the original on `count` windows of code-eval.txt, one window at a
    time (all the models' logits of all windows at once are gigabytes for a 49K vocabulary)."""
    windows = token_windows(tok(read_text(EVAL))["input_ids"], length, count)
    nll = {k: 0.0 for k in models}
    kl = {k: 0.0 for k in models}
    with torch.no_grad():
        for w in windows:
            ref = models["original"](w[None])
            for k, m in models.items():
                q = lm_metrics(m(w[None]), w[None], ref)
                nll[k] += math.log(q["perplexity"]) / len(windows)
                kl[k] += q["kl_to_reference"] / len(windows)
    return {k: {"perplexity": math.exp(nll[k]), "kl": kl[k]} for k in models}


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | predicted | measured latency | perplexity | KL "
             "| INT8 branches / rewrites |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pred = f"{r['predicted']:.3f}" if r.get("predicted") not in (None, 1.0) else ""
        rw = f"{r['int8_branches']} / {r['rewrites']}" if "rewrites" in r else ""
        lines.append(f"| {r['model']} | {r['variant']} | {pred} | {r['measured']:.3f} "
                     f"| {r['perplexity']:.3f} | {r['kl']:.4f} | {rw} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="refllama")
    ap.add_argument("--smollm2", help="SmolLM2-135M-Instruct .gguf")
    ap.add_argument("--budgets", default="0.75,0.5")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/torch_int8_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    work = Path(tempfile.mkdtemp(prefix="torch-int8-"))
    target = str(work / "cpu.json")
    t0 = time.perf_counter()
    Path(target).write_text(json.dumps(measure_cpu(args.threads)))
    print(f"target measured in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for name in args.models.split(","):
        if name == "refllama":
            source, dense = str(REFLLAMA), load_hf_directory(REFLLAMA)
        elif name == "smollm2":
            if not args.smollm2:
                raise SystemExit("--models smollm2 needs --smollm2 FILE.gguf")
            source, dense = args.smollm2, load_gguf(args.smollm2)
        else:
            raise SystemExit(f"unknown model {name}")
        rows += run_model(name, source, dense.eval(), budgets, args.prompt_len, target, args.repeats,
                          args.eval_windows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    meta = {"date": date.today().isoformat(), "commit": commit.strip(),
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "prompt_len": args.prompt_len,
            "engine": torch.backends.quantized.engine}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
