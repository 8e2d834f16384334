"""TVM against onnxruntime on the same ONNX artifact, on this CPU (issue 26): MiniLM at 1 × 128
tokens and refllama-16m at 1 × 512, the dense model (compiled at budget 1: the input with tailor's
lossless clean-ups) and one tailor plan (budget 0.5, objective latency, target cpu). Each
artifact's model.onnx gets TVM builds with tailor's hand schedules (--tune-trials 0) and tuned
with the given MetaSchedule samples (tailor.codegen.tvm.tune); all are timed with onnxruntime
side by side in one process (same thread count, alternating runs, medians), with the load average
before and after.

    python benchmarks/tvm_vs_ort.py [--trials 256] [--threads 2] [--repeats 30] [--work DIR]

--work keeps the compiled artifacts (a plan at 0.5 takes minutes to search) and the builds'
tuning records, which the next run reuses (delete the folder to tune again from nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import date, datetime
from pathlib import Path

import torch

import tailor
from tailor.backends.runners import OrtModel
from tailor.cli.default_model import cache_dir, default_calibration, minilm_onnx
from tailor.quality.metrics import time_side_by_side

REPO = Path(__file__).resolve().parent.parent
SHARED = (REPO / "../shared").resolve()


def artifact(onnx: Path, budget: float, prompt_len: int, calib, calib_len, calib_windows, out: Path) -> Path:
    if not (out / "model.onnx").is_file():
        tailor.compile(onnx, budget, objective="latency", target="cpu", prompt_len=prompt_len, calib=calib,
                       calib_len=calib_len, calib_windows=calib_windows, progress=True,
                       formats=("onnx",)).save(out, force=True)
    return out


def tvm_build(art: Path, trials: int, prompt_len: int) -> tuple[torch.nn.Module, dict]:
    """A TVM build of the artifact's model.onnx in art/tvm-N, reusing that folder's records."""
    from tailor.codegen.tvm.build import build
    from tailor.codegen.tvm.module import TvmModel
    from tailor.codegen.tvm.tune import TUNE_DB

    out = art / f"tvm-{trials}"
    out.mkdir(exist_ok=True)
    model = json.loads((art / "report.json").read_text())["model"]
    t0 = time.perf_counter()
    info = build(art / "model.onnx", out, batch=1, seq_len=prompt_len, causal=model["task"] == "causal-lm",
                 vocab_size=model["vocab_size"], tune_trials=trials, records=out / TUNE_DB, progress=True)
    info["build_s"] = round(time.perf_counter() - t0, 1)
    return TvmModel(out), info


def run_model(name: str, key: str, onnx: Path, prompt_len: int, calib, calib_len, calib_windows,
              args) -> list[dict]:
    rows = []
    for budget in (1.0, 0.5):
        art = artifact(onnx, budget, prompt_len, calib, calib_len, calib_windows,
                       Path(args.work) / f"{key}-{budget:g}")
        ort = OrtModel(art / "model.onnx", args.threads)
        hand, hand_info = tvm_build(art, 0, prompt_len)
        tuned, tuned_info = tvm_build(art, args.trials, prompt_len)
        vocab = json.loads((art / "report.json").read_text())["model"]["vocab_size"]
        ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        times = time_side_by_side({"ort": ort, "hand": hand, "tuned": tuned}, ids,
                                  args.repeats, warmup=20)
        load_after = Path("/proc/loadavg").read_text().split()[:3]
        rows.append({"model": name, "budget": budget, "tokens": prompt_len, "ort_ms": times["ort"] * 1e3,
                     "tvm_hand_ms": times["hand"] * 1e3, "tvm_tuned_ms": times["tuned"] * 1e3,
                     "hand_vs_ort": times["hand"] / times["ort"],
                     "tuned_vs_ort": times["tuned"] / times["ort"],
                     "trials": args.trials, "tuning": tuned_info.get("tuning"),
                     "tuned_build_s": tuned_info["build_s"], "loadavg_before": load_before,
                     "loadavg_after": load_after})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--models", default="minilm,refllama")
    ap.add_argument("--work", default=str(cache_dir() / "tvm-vs-ort"))
    args = ap.parse_args()
    # read when TVM starts its thread pool; no spinning after a call, as for onnxruntime
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
    # the code timed: read before the run, which takes minutes
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    rows = []
    if "minilm" in args.models:
        rows += run_model("MiniLM", "minilm", minilm_onnx(), 128, default_calibration(), None, None, args)
    if "refllama" in args.models:
        from benchmarks.cpu_onnx import refllama_onnx

        calib = SHARED / "data" / "code-calib.txt"
        rows += run_model("refllama-16m", "refllama", refllama_onnx(), 512, calib, 512, 16, args)
    print(f"\n{date.today()} · commit {commit} · {platform.machine()} · {os.cpu_count()} cores · "
          f"{args.threads} threads · {args.trials} trials\n")
    print("| model | budget | onnxruntime ms | TVM hand ms | TVM tuned ms | hand / ort | tuned / ort "
          "| kernels tuned | tuning s | loadavg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["tuning"] or {}
        print(f"| {r['model']} | {r['budget']:g} | {r['ort_ms']:.1f} | {r['tvm_hand_ms']:.1f} | "
              f"{r['tvm_tuned_ms']:.1f} | {r['hand_vs_ort']:.2f} | {r['tuned_vs_ort']:.2f} | "
              f"{t.get('kernels_tuned', 0)} (+{t.get('kernels_reused', 0)} reused) | "
              f"{t.get('seconds', 0):.0f} | "
              f"{' '.join(r['loadavg_before'])} → {' '.join(r['loadavg_after'])} |")
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"tvm_vs_ort_{datetime.now():%Y%m%d_%H%M}.json"
    path.write_text(json.dumps({"commit": commit, "trials": args.trials, "threads": args.threads,
                                "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
