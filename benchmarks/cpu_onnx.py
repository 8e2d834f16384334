"""ONNX in, ONNX out, on this CPU: MiniLM and refllama-16m exported to ONNX, compiled from the
.onnx file alone (objective latency; target: this CPU measured first, as `tailor calibrate-target`
does, and the cost model fitted to each model timed here; --target cpu for the nominal peaks)
at budgets 0.75 and 0.5, then timed with onnxruntime beside the original (same thread count, alternating
runs, medians).

Quality: MiniLM, the mean cosine of mean-pooled sentence embeddings against the original on
held-out English sentences (docstrings of standard-library modules never used in calibration);
refllama-16m, perplexity on code-eval.txt (512-token windows), calibrated on code-calib.txt.
MiniLM calibrates with compile's encoder default: the calibration sentences whole, each its own
input ([CLS] … [SEP]), 16384 tokens of them (before: windows of their median length, 8192
tokens; 32-token windows cut anywhere, 128-token ones and too few tokens all did worse); every
plan is refitted in sequence after the search (tailor.passes.refit); latency is timed on 1 × 128 tokens
(MiniLM) and 1 × 512 (refllama), the workloads the budgets are priced for. Every artifact (the
original too, compiled at budget 1) also carries its TVM CPU build (`--format onnx,tvm`), timed
in the same alternation with TVM_NUM_THREADS = --threads.

    python benchmarks/cpu_onnx.py [--budgets 0.75,0.5] [--threads 2] [--repeats 30] [--target measured]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import tailor
from tailor.backends.export import export_onnx
from tailor.backends.runners import OrtModel
from tailor.cli.default_model import (
    EVAL_MODULES,
    cache_dir,
    default_calibration,
    docstring_sentences,
    minilm_onnx,
)
from tailor.data.text import load_tokenizer, read_text, token_windows
from tailor.quality.metrics import lm_metrics, time_side_by_side
from tailor.rewriter.capture import TOKENIZER_FILES, load_hf_directory
from tailor.runtime.target_table import measure_cpu

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / "../shared").resolve()
REFLLAMA = SHARED / "models" / "refllama-16m"
def refllama_onnx() -> Path:
    out = cache_dir() / "refllama-16m-onnx" / "model.onnx"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(load_hf_directory(REFLLAMA), out, encoder=False)
        for name in TOKENIZER_FILES:
            if (REFLLAMA / name).is_file():
                (out.parent / name).write_bytes((REFLLAMA / name).read_bytes())
    return out


def minilm_quality(models: dict[str, OrtModel], tok, held_out: list[str]) -> dict[str, float]:
    emb = {k: [] for k in models}
    for s in held_out:
        ids = torch.tensor([tok(s)["input_ids"]])
        for k, m in models.items():
            emb[k].append(m(ids)[0].double().mean(0))
    ref = torch.stack(emb["original"])
    return {k: float(torch.cosine_similarity(torch.stack(v), ref, -1).mean()) for k, v in emb.items()}


def refllama_quality(models: dict[str, OrtModel], windows: torch.Tensor) -> dict[str, float]:
    logits = {k: torch.cat([m(w[None]) for w in windows]) for k, m in models.items()}
    return {k: lm_metrics(v, windows, logits["original"])["perplexity"] for k, v in logits.items()}


def run_model(name: str, onnx: Path, budgets: list[float], prompt_len: int, calib: Path,
              calib_len: int | None, calib_windows: int | None, threads: int, repeats: int, work: Path,
              target: str) -> list[dict]:
    rows, models, compiled, tvm_models = [], {"original": OrtModel(onnx, threads)}, {}, {}
    for b in [1.0] + budgets:
        t0 = time.perf_counter()
        opt = tailor.compile(onnx, b, objective="latency", target=target, prompt_len=prompt_len,
                             calib=calib, calib_len=calib_len, calib_windows=calib_windows, progress=True,
                             formats=("onnx", "tvm"))
        out = opt.save(work / f"{name}-{b:g}")
        key = "original" if b == 1.0 else f"{b:g}"
        tvm_models[f"tvm {key}"] = tailor.load(out, runtime="tvm").model
        if b < 1.0:
            compiled[b] = (opt, time.perf_counter() - t0)
            models[key] = OrtModel(out / "model.onnx", threads)
    vocab = opt.graph.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    times = time_side_by_side(models | tvm_models, ids, repeats, warmup=20)
    if name == "MiniLM":
        quality = minilm_quality(models, load_tokenizer(onnx.parent), docstring_sentences(EVAL_MODULES)[:300])
        metric = "embedding cosine"
    else:
        tok = load_tokenizer(onnx.parent)
        eval_ids = tok(read_text(SHARED / "data" / "code-eval.txt"))["input_ids"]
        windows = token_windows(eval_ids, prompt_len, 16)
        quality = refllama_quality(models, windows)
        metric = "perplexity"
    for key in models:
        opt, secs = compiled.get(float(key), (None, 0.0)) if key != "original" else (None, 0.0)
        rows.append({"model": name, "budget": key, "predicted": opt.plan.predicted["latency"] if opt else 1.0,
                     "measured": times[key] / times["original"], "ms": times[key] * 1e3,
                     "metric": metric, "quality": quality[key], "compile_s": secs,
                     "tvm_ms": times[f"tvm {key}"] * 1e3, "tvm_vs_ort": times[f"tvm {key}"] / times[key],
                     "rewrites": len(opt.plan.rewrites) if opt else 0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="0.75,0.5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--models", default="minilm,refllama")
    ap.add_argument("--target", default="measured", help="cost-model target: 'measured' (time this "
                    "machine first, as `tailor calibrate-target` does), a built-in name, or a table")
    args = ap.parse_args()
    # read when TVM starts its thread pool; no spinning after a call, as for onnxruntime (idle
    # spinning in one runtime steals the cores of the next one timed)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        target = args.target
        if target == "measured":
            table = measure_cpu(args.threads)
            target = str(work / "target.json")
            Path(target).write_text(json.dumps(table))
            print(f"measured target: {table['flops_per_s'] / 1e9:.0f} GFLOP/s peak, "
                  f"{table['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
        if "minilm" in args.models:
            rows += run_model("MiniLM", minilm_onnx(), budgets, 128, default_calibration(), None, None,
                              args.threads, args.repeats, work, target)
        if "refllama" in args.models and REFLLAMA.is_dir():
            rows += run_model("refllama-16m", refllama_onnx(), budgets, 512,
                              SHARED / "data" / "code-calib.txt", 512, 16, args.threads, args.repeats, work,
                              target)
    print(f"\n{date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
          f"onnxruntime, {args.threads} threads · objective latency, target {args.target}\n")
    print("| model | budget | predicted latency | measured latency | ms | quality | rewrites | compile s "
          "| TVM ms | TVM / onnxruntime |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['budget']} | {r['predicted']:.3f} | {r['measured']:.3f} | "
              f"{r['ms']:.1f} | {r['metric']} {r['quality']:.4f} | {r['rewrites']} | {r['compile_s']:.0f} | "
              f"{r['tvm_ms']:.1f} | {r['tvm_vs_ort']:.2f} |")
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
