"""ONNX files as users have them (issue 25): each kind made here from a real model, compiled at
budget 0.5 (objective latency, target: this CPU measured first), and either it works — measured
latency against the input file, side by side in onnxruntime, and quality against the input —
or it is refused, with the one line tailor said.

Kinds, from MiniLM (all-MiniLM-L6-v2, the encoder of the demo) and refllama-16m (a trained Llama):
- static shape: exported without dynamic axes (batch 1 and the workload's length fixed);
- onnxruntime-fused: onnxruntime.transformers.optimizer (SkipLayerNormalization, BiasGelu, and
  Attention where it matches the export's attention);
- fp16: the same converted to float16 with float32 inputs and outputs (keep_io_types);
- int8 dynamic: onnxruntime.quantization.quantize_dynamic (MatMulInteger), per channel;
- QDQ static: quantize_static, QDQ format, calibrated on ten of the calibration inputs;
- int4 MatMulNBits: onnxruntime's MatMulNBitsQuantizer (block 32, symmetric).
Quality is measured on text no calibration reads: MiniLM, the mean cosine of mean-pooled
embeddings against the input's on 300 English docstring sentences; refllama, perplexity on 16
windows of code-eval.txt and its ratio to the input's.

    python benchmarks/onnx_inputs.py [--models minilm,refllama] [--kinds static,fused,...] [--repeats 30]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx
import torch

import tailor
from benchmarks.cpu_onnx import REFLLAMA, SHARED, minilm_quality, refllama_quality
from tailor.backends.export import export_onnx
from tailor.backends.runners import OrtModel
from tailor.cli.default_model import EVAL_MODULES, default_calibration, docstring_sentences, minilm_directory
from tailor.core.errors import TailorError
from tailor.data.text import load_tokenizer, read_text, token_windows
from tailor.quality.metrics import time_side_by_side
from tailor.rewriter.capture import TOKENIZER_FILES, load_hf_directory
from tailor.runtime.target_table import measure_cpu

KINDS = ("static", "fused", "fp16", "int8_dynamic", "qdq", "int4_nbits")
TITLES = {"static": "static shape (batch 1, fixed length)", "fused": "onnxruntime-fused",
          "fp16": "fp16 (float32 I/O)", "int8_dynamic": "int8 dynamic (MatMulInteger)",
          "qdq": "QDQ static int8", "int4_nbits": "int4 MatMulNBits"}


class Model:
    """A base model: its HF folder, how it is exported, its workload and calibration."""

    def __init__(self, name: str, folder: Path, encoder: bool, prompt_len: int, calib: Path,
                 calib_len: int | None):
        self.name, self.folder, self.encoder = name, folder, encoder
        self.prompt_len, self.calib, self.calib_len = prompt_len, calib, calib_len

    def export(self, out: Path, static: bool) -> Path:
        path = out / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(load_hf_directory(self.folder), path, encoder=self.encoder, seq_len=self.prompt_len,
                    batch=1, static_axes=(0, 1) if static else ())
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():
                shutil.copy(self.folder / name, out / name)
        return path


def make_kind(model: Model, kind: str, work: Path) -> tuple[Path, Path]:
    """(the input file of `kind`, the file it was made from: the float, dynamic-axes export)."""
    base = work / model.name / "float" / "model.onnx"
    if not base.is_file():
        model.export(base.parent, static=False)
    if kind == "static":
        return model.export(work / model.name / kind, static=True), base
    out = work / model.name / kind
    out.mkdir(parents=True, exist_ok=True)
    for f in base.parent.iterdir():
        if f.name != "model.onnx":
            shutil.copy(f, out / f.name)
    path = out / "model.onnx"
    config = json.loads((model.folder / "config.json").read_text())
    if kind == "fused" or (kind == "fp16" and model.encoder):
        from onnxruntime.transformers import optimizer

        if not model.encoder:
            return path, base  # decoders come fused from onnxruntime-genai's builder: not made here
        opt = optimizer.optimize_model(str(base), model_type="bert", num_heads=config["num_attention_heads"],
                                       hidden_size=config["hidden_size"])
        if kind == "fp16":
            opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(path))
    elif kind == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(base)), keep_io_types=True), str(path))
    elif kind == "int8_dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(base), str(path), weight_type=QuantType.QInt8, per_channel=True)
    elif kind == "qdq":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

        feeds = calibration_feeds(model, base)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.rows = iter(feeds)

            def get_next(self):
                return next(self.rows, None)

        quantize_static(str(base), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    elif kind == "int4_nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(base)), block_size=32, is_symmetric=True)
        quantizer.process()
        onnx.save(quantizer.model.model, str(path))
    else:
        raise KeyError(kind)
    return path, base


def calibration_feeds(model: Model, base: Path, count: int = 10) -> list[dict[str, np.ndarray]]:
    """Inputs of the calibration text for quantize_static, each of the workload's length."""
    tok = load_tokenizer(base.parent)
    ids = tok(read_text(model.calib))["input_ids"]
    windows = token_windows(ids, model.prompt_len, count)
    names = [i.name for i in OrtModel(base, 1).session.get_inputs()]
    return [{n: (w[None].numpy() if "input_ids" in n else np.ones((1, model.prompt_len), np.int64))
             for n in names} for w in windows]


def quality(model: Model, models: dict[str, OrtModel], base: Path) -> dict[str, float]:
    """Each model's quality against the one keyed "input"."""
    if model.encoder:
        tok = load_tokenizer(base.parent)
        # cut to the workload's length: a static-shape input takes no longer sentence
        held_out = [tok.decode(tok(s)["input_ids"][1:model.prompt_len - 1])
                    for s in docstring_sentences(EVAL_MODULES)[:300]]
        emb = minilm_quality(models | {"original": models["input"]}, tok, held_out)
        return {k: emb[k] for k in models}
    tok = load_tokenizer(base.parent)
    eval_ids = tok(read_text(SHARED / "data" / "code-eval.txt"))["input_ids"]
    windows = token_windows(eval_ids, model.prompt_len, 16)
    ppl = refllama_quality(models | {"original": models["input"]}, windows)
    return {k: ppl[k] for k in models}


def run_kind(model: Model, kind: str, work: Path, target: str, threads: int, repeats: int) -> dict | None:
    path, base = make_kind(model, kind, work)
    if not path.is_file():
        return None
    row = {"model": model.name, "kind": kind, "input_mb": path.stat().st_size / 2**20}
    t0 = time.perf_counter()
    try:
        opt = tailor.compile(path, 0.5, objective="latency", target=target, prompt_len=model.prompt_len,
                             calib=model.calib, calib_len=model.calib_len, progress=True, formats=("onnx",))
    except TailorError as e:
        return row | {"works": False, "said": str(e).replace(str(path), "model.onnx")}
    out = opt.save(work / model.name / f"{kind}-out")
    causal = not model.encoder
    models = {"input": OrtModel(path, threads, causal=causal),
              "artifact": OrtModel(out / "model.onnx", threads, causal=causal)}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, opt.graph.vocab_size, (1, model.prompt_len), generator=gen)
    times = time_side_by_side(models, ids, repeats, warmup=10)
    q = quality(model, models, path)
    return row | {"works": True, "compile_s": time.perf_counter() - t0,
                  "predicted": opt.plan.predicted["latency"],
                  "measured": times["artifact"] / times["input"], "input_ms": times["input"] * 1e3,
                  "metric": "embedding cosine" if model.encoder else "perplexity",
                  "quality_input": q["input"], "quality_artifact": q["artifact"],
                  "rewrites": len(opt.plan.rewrites), "clean_ups": opt.report.get("clean_ups")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,refllama")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, help="write the rows here (.json), after every row")
    args = ap.parse_args()
    models = []
    if "minilm" in args.models:
        models.append(Model("MiniLM", minilm_directory(), True, 128, default_calibration(), None))
    if "refllama" in args.models and REFLLAMA.is_dir():
        models.append(Model("refllama-16m", REFLLAMA, False, 512, SHARED / "data" / "code-calib.txt", 512))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        target = str(work / "target.json")
        Path(target).write_text(json.dumps(measure_cpu(args.threads)))
        for model in models:
            for kind in args.kinds.split(","):
                row = run_kind(model, kind, work, target, args.threads, args.repeats)
                if row is None:
                    continue
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    args.out.write_text(json.dumps(rows, indent=1))
    print(f"\n{date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
          f"onnxruntime {args.threads} threads · budget 0.5, objective latency, target this CPU measured\n")
    print("| model | input kind | works | measured latency vs input | predicted | quality vs input "
          "| rewrites |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["works"]:
            print(f"| {r['model']} | {TITLES[r['kind']]} | refused: {r['said']} | | | | |")
            continue
        q = f"{r['metric']} {r['quality_artifact']:.4f}" + \
            ("" if r["metric"] == "embedding cosine" else f" (input {r['quality_input']:.3f})")
        print(f"| {r['model']} | {TITLES[r['kind']]} | works | {r['measured']:.3f} | {r['predicted']:.3f} | "
              f"{q} | {r['rewrites']} |")


if __name__ == "__main__":
    main()
