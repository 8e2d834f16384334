"""ONNX files as users have them (issue 25): each kind made here from a real model, compiled at
--budget (0.5; objective latency, target: this CPU measured first), and either it works — measured
latency against the input file, side by side in onnxruntime, and quality against the input —
or it is refused, with the one line tailor said.

Kinds, from MiniLM (all-MiniLM-L6-v2, the encoder of the demo) and refllama-16m (a trained Llama):
- static shape: exported without dynamic axes (batch 1 and the workload's length fixed);
- onnxruntime-fused: onnxruntime.transformers.optimizer (SkipLayerNormalization, BiasGelu, and
  Attention where it matches the export's attention);
- fp16: the same converted to float16 with float32 inputs and outputs (keep_io_types);
- int8 dynamic: onnxruntime.quantization.quantize_dynamic (MatMulInteger), per channel;
- QDQ static: quantize_static, QDQ format, calibrated on ten of the calibration inputs;
- int4 MatMulNBits: onnxruntime's MatMulNBitsQuantizer (block 32, symmetric);
- optimum: optimum-onnx's exporter in its own environment (scripts/optimum_env.sh; the venv at
  $TAILOR_OPTIMUM_VENV, default /work/optimum-venv): MiniLM as `feature-extraction`, refllama as
  `text-generation-with-past` (KV cache inputs and outputs). Its artifact is then loaded by the
  clients users run it with: Optimum's ORTModel (in that environment) and, for the decoder,
  onnxruntime-genai, each compared with tailor's own runtime on the same artifact (greedy
  continuation of 16 tokens; MiniLM: the embeddings); and the decoder's KV cache at 4096 tokens
  is read from its cache inputs' declared shapes, the input's and the artifact's;
- genai_fp32, genai_int4: refllama as onnxruntime-genai's model builder writes it (`python -m
  onnxruntime_genai.models.builder -i DIR -o OUT -p fp32|int4 -e cpu`).
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
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import onnx
import torch

import tailor
from benchmarks.cpu_onnx import REFLLAMA, SHARED, minilm_quality, refllama_quality
from tailor.backends.export import export_onnx
from tailor.backends.onnx_export_folder import genai_continuation
from tailor.backends.runners import OrtModel
from tailor.cli.default_model import EVAL_MODULES, default_calibration, docstring_sentences, minilm_directory
from tailor.core.errors import TailorError
from tailor.data.text import load_tokenizer, read_text, token_windows
from tailor.quality.metrics import time_side_by_side
from tailor.rewriter.capture import TOKENIZER_FILES, load_hf_directory
from tailor.rewriter.onnx_check import genai_head_size
from tailor.rewriter.quantized import QUANTIZED_OPS
from tailor.runtime.target_table import measure_cpu

KINDS = ("static", "fused", "fp16", "int8_dynamic", "qdq", "int4_nbits", "optimum", "genai_fp32",
         "genai_int4")
OPTIMUM_PYTHON = Path(os.environ.get("TAILOR_OPTIMUM_VENV", "/work/optimum-venv")) / "bin" / "python"
KV_TOKENS = 4096
CONTINUATION = 16
TITLES = {"optimum": "Optimum export (feature-extraction / text-generation-with-past)",
          "genai_fp32": "onnxruntime-genai builder, fp32", "genai_int4": "onnxruntime-genai builder, int4",
          "static": "static shape (batch 1, fixed length)", "fused": "onnxruntime-fused",
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
                    batch=1 if static else 2, static_axes=(0, 1) if static else ())
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():
                shutil.copy(self.folder / name, out / name)
        return path


def base_models(names: list[str]) -> list[Model]:
    """The base models asked for ("minilm", "refllama"; refllama-16m where ../shared holds it)."""
    models = []
    if "minilm" in names:
        models.append(Model("MiniLM", minilm_directory(), True, 128, default_calibration(), None))
    if "refllama" in names and REFLLAMA.is_dir():
        models.append(Model("refllama-16m", REFLLAMA, False, 512, SHARED / "data" / "code-calib.txt", 512))
    return models


def make_kind(model: Model, kind: str, work: Path) -> tuple[Path, Path]:
    """(the input file of `kind`, the file it was made from: the float, dynamic-axes export)."""
    base = work / model.name / "float" / "model.onnx"
    if not base.is_file():
        model.export(base.parent, static=False)
    if kind == "static":
        return model.export(work / model.name / kind, static=True), base
    if kind == "optimum":
        return optimum_export(model, work / model.name / kind), base
    if kind.startswith("genai_"):
        return genai_build(model, kind.removeprefix("genai_"), work / model.name / kind), base
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


def in_optimum_env(*args: str) -> str:
    """Run python in the Optimum environment (tailor's PYTHONPATH left out); its stdout."""
    if not OPTIMUM_PYTHON.is_file():
        raise SystemExit(f"no Optimum environment at {OPTIMUM_PYTHON}: bash scripts/optimum_env.sh makes it")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(OPTIMUM_PYTHON), *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return proc.stdout


def optimum_export(model: Model, out: Path) -> Path:
    """The model exported by optimum-onnx as users run it, with the model's tokenizer files."""
    task = "feature-extraction" if model.encoder else "text-generation-with-past"
    in_optimum_env("-c", "import sys; from optimum.exporters.onnx import main_export; "
                   "main_export(sys.argv[1], sys.argv[2], task=sys.argv[3], local_files_only=True)",
                   str(model.folder), str(out), task)
    for name in TOKENIZER_FILES:
        if (model.folder / name).is_file():
            shutil.copy(model.folder / name, out / name)
    return out / "model.onnx"


def genai_build(model: Model, precision: str, out: Path) -> Path:
    """The decoder as onnxruntime-genai's model builder writes it (GroupQueryAttention, its own KV
    I/O, MatMulNBits at int4); the builder takes no encoder (then no file: the kind is skipped)."""
    if not model.encoder:
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model.folder),
                        "-o", str(out), "-p", precision, "-e", "cpu"], check=True, capture_output=True)
    return out / "model.onnx"


OPTIMUM_CLIENT = """import json, sys, torch
from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForFeatureExtraction
x = torch.tensor([json.loads(sys.argv[2])])
mask = torch.ones_like(x)
if sys.argv[3] == "encoder":
    m = ORTModelForFeatureExtraction.from_pretrained(sys.argv[1])
    extra = {"token_type_ids": torch.zeros_like(x)} if "token_type_ids" in m.input_names else {}
    print(json.dumps(m(input_ids=x, attention_mask=mask, **extra).last_hidden_state[0].tolist()))
else:
    m = ORTModelForCausalLM.from_pretrained(sys.argv[1])
    n = int(sys.argv[4])
    y = m.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    print(json.dumps(y[0, x.shape[1]:].tolist()))
"""


def kv_cache_bytes(path: Path, tokens: int = KV_TOKENS) -> int:
    """Bytes of a decoder's KV cache at `tokens` positions, from its cache inputs' declared
    [batch, kv heads, past, head size] (batch 1) and element type."""
    total = 0
    for i in onnx.load(str(path), load_external_data=False).graph.input:
        if i.name.startswith("past_key_values."):
            # the builder's input names the head size (kv_cache_dim): its genai_config gives it
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            dims[3] = dims[3] or genai_head_size(path) or 0
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).itemsize
            total += dims[1] * dims[3] * tokens * itemsize
    return total


def client_failure(e: Exception) -> str:
    """The last line a failed client said (its exception), for the row."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else repr(e))


def clients(model: Model, out: Path, path: Path, ids: torch.Tensor) -> dict:
    """Which runtimes load the artifact of an Optimum export, each checked against tailor's own
    on it: Optimum's ORTModel, onnxruntime-genai (decoders). A client that fails is recorded with
    what it said."""
    prompt = ids[0, :32].tolist()
    if model.encoder:
        ours = tailor.load(out).model(torch.tensor([prompt]))[0].numpy()
        try:
            theirs = np.asarray(json.loads(in_optimum_env("-c", OPTIMUM_CLIENT, str(out), json.dumps(prompt),
                                                          "encoder").splitlines()[-1]))
        except RuntimeError as e:
            return {"optimum": client_failure(e)}
        return {"optimum": "loads", "optimum_max_abs_diff": float(np.abs(theirs - ours).max())}
    row = genai_client(out, path, ids)
    try:
        optimum = json.loads(in_optimum_env("-c", OPTIMUM_CLIENT, str(out), json.dumps(prompt), "decoder",
                                            str(CONTINUATION)).splitlines()[-1])
        row |= {"optimum": "loads", "optimum_equal": optimum == row["tailor_continuation"],
                "optimum_continuation": optimum,
                "optimum_equals_genai": optimum == row.get("genai_continuation")}
    except RuntimeError as e:
        row["optimum"] = client_failure(e)
    return row


def genai_client(out: Path, path: Path, ids: torch.Tensor) -> dict:
    """Whether onnxruntime-genai loads a decoder's artifact (its genai_config.json written or
    updated), checked against tailor's own runtime on it; the KV cache's size before and after."""
    prompt = ids[0, :32].tolist()
    ours = tailor.load(out).generate([prompt], CONTINUATION)[0]
    row = {"tailor_continuation": ours, "kv_bytes_input": kv_cache_bytes(path),
           "kv_bytes_artifact": kv_cache_bytes(out / "model.onnx"),
           "genai": "no genai_config.json (KV heads differ between layers)"}
    if (out / "genai_config.json").is_file():
        try:
            theirs = genai_continuation(out, prompt, CONTINUATION)
            row |= {"genai": "loads", "genai_equal": theirs == ours, "genai_continuation": theirs}
        except Exception as e:  # onnxruntime-genai raises its own types
            row["genai"] = client_failure(e)
    return row


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


def quantized_ops(path: Path) -> dict[str, int]:
    """The quantized ops of an ONNX file, counted by type: whether an artifact stayed quantized."""
    return dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node
                        if n.op_type in QUANTIZED_OPS))


def run_kind(model: Model, kind: str, work: Path, target: str, threads: int, repeats: int,
             passes: list[str] | None = None, budget: float = 0.5) -> dict | None:
    path, base = make_kind(model, kind, work)
    if not path.is_file():
        return None
    row = {"model": model.name, "kind": kind, "input_mb": path.stat().st_size / 2**20}
    t0 = time.perf_counter()
    try:
        opt = tailor.compile(path, budget, objective="latency", target=target, prompt_len=model.prompt_len,
                             calib=model.calib, calib_len=model.calib_len, progress=True, formats=("onnx",),
                             passes=passes)
    except TailorError as e:
        return row | {"works": False, "said": str(e).replace(str(path), "model.onnx")}
    out = opt.save(work / model.name / f"{kind}-out")
    causal = not model.encoder
    models = {"input": OrtModel(path, threads, causal=causal),
              "artifact": OrtModel(out / "model.onnx", threads, causal=causal)}
    # the float export the kind was made from, timed beside: a budget is a fraction of the input's
    # own time, and a quantized input's is a fraction of a faster (or slower) model's
    timed = models | ({"float": OrtModel(base, threads, causal=causal)} if base != path else {})
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, opt.graph.vocab_size, (1, model.prompt_len), generator=gen)
    times = time_side_by_side(timed, ids, repeats, warmup=10)
    q = quality(model, models, path)
    if kind == "optimum":
        row |= clients(model, out, path, ids)
    elif kind.startswith("genai_"):
        row |= genai_client(out, path, ids)
    return row | {"works": True, "compile_s": time.perf_counter() - t0,
                  "artifact_mb": (out / "model.onnx").stat().st_size / 2**20,
                  "quantized_ops": {"input": quantized_ops(path),
                                    "artifact": quantized_ops(out / "model.onnx")},
                  "predicted": opt.plan.predicted["latency"],
                  "budget": budget, "predicted_flops": opt.plan.predicted["flops"],
                  "measured": times["artifact"] / times["input"], "input_ms": times["input"] * 1e3,
                  "float_ms": times.get("float", times["input"]) * 1e3,
                  "metric": "embedding cosine" if model.encoder else "perplexity",
                  "quality_input": q["input"], "quality_artifact": q["artifact"],
                  "rewrites": len(opt.plan.rewrites), "clean_ups": opt.report.get("clean_ups"),
                  "passes": dict(Counter(r["pass"] for r in opt.plan.rewrites)),
                  # whether the prediction came from a fitted cost model (scales, variants left out)
                  "cost_model": opt.report.get("cost_model")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,refllama")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, help="write the rows here (.json), after every row")
    ap.add_argument("--passes", help="comma list of passes the search may use (default all)")
    ap.add_argument("--budget", type=float, default=0.5)
    args = ap.parse_args()
    models = base_models(args.models.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        target = str(work / "target.json")
        Path(target).write_text(json.dumps(measure_cpu(args.threads)))
        for model in models:
            for kind in args.kinds.split(","):
                row = run_kind(model, kind, work, target, args.threads, args.repeats,
                               args.passes.split(",") if args.passes else None, args.budget)
                if row is None:
                    continue
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    args.out.write_text(json.dumps(rows, indent=1))
    print(f"\n{date.today()} · {platform.processor() or platform.machine()} · {os.cpu_count()} cores · "
          f"onnxruntime {args.threads} threads · budget {args.budget:g}, objective latency, target this CPU "
          f"measured\n")
    print("| model | input kind | works | measured latency vs input | predicted | quality vs input "
          "| rewrites by pass | clients that loaded the artifact | KV cache at 4K: artifact / input "
          "| compile |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["works"]:
            print(f"| {r['model']} | {TITLES[r['kind']]} | refused: {r['said']} | | | | | | | |")
            continue
        q = f"{r['metric']} {r['quality_artifact']:.4f}" + \
            ("" if r["metric"] == "embedding cosine" else f" (input {r['quality_input']:.3f})")
        passes = ", ".join(f"{name} {n}" for name, n in sorted(r["passes"].items()))
        print(f"| {r['model']} | {TITLES[r['kind']]} | works | {r['measured']:.3f} | {r['predicted']:.3f} | "
              f"{q} | {passes} | {client_summary(r)} | {kv_summary(r)} | {r['compile_s']:.0f} s |")


def client_summary(row: dict) -> str:
    """Which clients loaded an artifact and whether they answered as tailor's runtime does."""
    said = []
    for client, title in (("optimum", "Optimum"), ("genai", "onnxruntime-genai")):
        if client not in row:
            continue
        if row[client] != "loads":
            said.append(f"{title}: {row[client]}")
        elif f"{client}_equal" in row:
            said.append(f"{title} (greedy 16 {'=' if row[client + '_equal'] else '≠'} tailor's)")
        else:
            said.append(f"{title} (max abs Δ {row.get(client + '_max_abs_diff', float('nan')):.1g})")
    return "; ".join(said) or "(tailor's runtime only: no client for this kind)"


def kv_summary(row: dict) -> str:
    """A decoder's KV cache at 4K tokens, artifact / input, where its graph holds one."""
    if not row.get("kv_bytes_input"):
        return ""
    return (f"{row['kv_bytes_artifact'] / 2**20:.1f} / {row['kv_bytes_input'] / 2**20:.1f} MiB "
            f"({row['kv_bytes_artifact'] / row['kv_bytes_input']:.3f})")

if __name__ == "__main__":
    main()
