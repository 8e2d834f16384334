"""Budget 1.0 is the identity: outputs match the original within 1e-5, in memory and from disk."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import tailor
from tailor.backends.runners import OrtModel
from tailor.cli.main import optimize_main
from tests.conftest import FAMILIES, ids_for


def _main_output(model, ids):
    out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_identity_compile_save_load(name, tiny_models, tmp_path):
    model = tiny_models[name]
    ids = ids_for()
    with torch.no_grad():
        expected = _main_output(model, ids)
        compiled = tailor.compile(model, budget=1.0)
        got = compiled.model(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5
    assert compiled.plan.rewrites == [] and compiled.plan.budget == 1.0
    json.dumps(compiled.plan.to_json())  # JSON-serialisable

    out = compiled.save(tmp_path / "art")
    assert {"plan.json", "report.json", "manifest.json", "model.safetensors", "config.json"} <= \
        {p.name for p in out.iterdir()}
    loaded = tailor.load(out)
    with torch.no_grad():
        again = loaded.model(ids)
    assert (again - expected).abs().max() <= 1e-5
    assert loaded.plan == compiled.plan


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_identity_cli(name, tiny_onnx, tmp_path, capsys):
    src = tiny_onnx[name]
    before = _sha(src)
    out = tmp_path / "art"
    assert optimize_main([str(src), "-o", str(out), "--budget", "1.0"]) == 0
    text = capsys.readouterr().out
    assert "✓ shapes match" in text and "✓ max abs diff" in text
    assert _sha(src) == before  # the input is never modified
    ids = ids_for(batch=1).numpy()
    ref = OrtModel(src).run_numpy(ids)
    got = OrtModel(out / "model.onnx").run_numpy(ids)
    assert ref.shape == got.shape
    assert np.abs(ref - got).max() <= 1e-5
    report = json.loads((out / "report.json").read_text())
    assert all(c["ok"] for c in report["validation"])
    assert report["model"]["layers"] == 3


def test_hf_directory_cli_with_onnx_format(tiny_hf_dirs, tiny_models, tmp_path, capsys):
    out = tmp_path / "art"
    assert optimize_main([str(tiny_hf_dirs["qwen2"]), "-o", str(out), "--format",
                          "safetensors,onnx"]) == 0
    assert "✓ max abs diff" in capsys.readouterr().out
    ids = ids_for(batch=1)
    with torch.no_grad():
        expected = _main_output(tiny_models["qwen2"], ids).numpy()
    got = OrtModel(out / "model.onnx").run_numpy(ids.numpy())
    assert np.abs(expected - got).max() <= 1e-4  # torch vs onnxruntime kernels
    # the safetensors half reloads with plain transformers too
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    with torch.no_grad():
        assert (hf(ids).logits.numpy() - expected).max() <= 1e-5


def test_onnx_with_external_data(tiny_onnx, tmp_path):
    """Weights in a side file inside the model's folder load; the artifact runs the same."""
    import onnx

    folder = tmp_path / "ext"
    folder.mkdir()
    proto = onnx.load(str(tiny_onnx["llama"]))
    onnx.save(proto, str(folder / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    assert (folder / "weights.bin").stat().st_size > 10_000
    compiled = tailor.compile(folder / "model.onnx")
    out = compiled.save(tmp_path / "art")
    ids = ids_for(batch=1).numpy()
    ref = OrtModel(folder / "model.onnx").run_numpy(ids)
    assert np.abs(OrtModel(out / "model.onnx").run_numpy(ids) - ref).max() <= 1e-5
