"""How an encoder is calibrated, and the sequential refit: MiniLM from its .onnx file at budget
0.75 (objective latency, 1 × 128 tokens, the nominal `cpu` target, so every row is priced alike
and rows differ only by their calibration), calibrated on the default English docstring
sentences three ways, each compiled with and without the refit after the search:
- windows: windows of the sentences' median length that begin at a sentence's [CLS], 8192 tokens
  (compile's encoder default before whole lines);
- lines 8192: the sentences whole, each its own input, 8192 tokens of them;
- lines 16384: the same, 16384 tokens (compile's encoder default; the text has about 20k).
Quality: mean cosine of mean-pooled embeddings vs the original on 300 held-out sentences, as in
benchmarks/cpu_onnx.py. Profiles are cached per calibration, so each row's second compile only
searches again.

    python benchmarks/encoder_calibration.py [--budget 0.75]
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import numpy as np
from cpu_onnx import minilm_quality

import tailor
from tailor.backends.runners import OrtModel
from tailor.cli.default_model import EVAL_MODULES, default_calibration, docstring_sentences, minilm_onnx
from tailor.data.text import load_tokenizer, tokenize_lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.75)
    args = ap.parse_args()
    onnx, calib = minilm_onnx(), default_calibration()
    tok = load_tokenizer(onnx.parent)
    ids, starts = tokenize_lines([calib.read_text()], tok)
    median = int(np.median(np.diff(np.append(starts, len(ids)))))
    held = docstring_sentences(EVAL_MODULES)[:300]
    setups = {"windows of the median length, 8192 tokens": dict(calib_len=median,
                                                                calib_windows=8192 // median),
              "whole lines, 8192 tokens": dict(calib_windows=8192 // median),
              "whole lines, 16384 tokens (default)": dict()}
    rows = []
    for name, kw in setups.items():
        models, kls = {"original": OrtModel(onnx)}, {}
        for refit in (False, True):
            t0 = time.perf_counter()
            opt = tailor.compile(onnx, args.budget, objective="latency", target="cpu", prompt_len=128,
                                 calib=calib, refit=refit, formats=("onnx",), **kw)
            models[refit] = opt.rewritten.runnable()
            kls[refit] = (opt.report["search"]["measured_kl_heldout"], opt.report.get("refit", {}),
                          opt.plan.predicted["latency"], time.perf_counter() - t0)
        q = minilm_quality(models, tok, held)
        r = kls[True][1]
        rows.append((name, kls[False][2], q[False], q[True], r.get("measured_kl_heldout_before"),
                     r.get("measured_kl_heldout_after"), r.get("kept"), kls[False][3]))
        print(rows[-1], flush=True)
    print(f"\n{date.today()} · {platform.processor() or platform.machine()} · MiniLM (ONNX) · budget "
          f"{args.budget} · objective latency · target cpu (nominal) · 1 × 128\n")
    print("| calibration | predicted latency | cosine, no refit | cosine, refit | held-out divergence before "
          "→ after refit | refit kept | compile s (no refit) |")
    print("|---|---|---|---|---|---|---|")
    for name, pred, q0, q1, before, after, kept, secs in rows:
        print(f"| {name} | {pred:.3f} | {q0:.4f} | {q1:.4f} | {before:.4f} → {after:.4f} | {kept} "
              f"| {secs:.0f} |")


if __name__ == "__main__":
    main()
