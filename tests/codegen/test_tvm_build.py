"""The TVM CPU build of an artifact (tailor.codegen.tvm): compiled from model.onnx, run through
relax.VirtualMachine, compared with onnxruntime on the same inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tailor
from tailor.core.errors import TailorError
from tests.conftest import ids_for

pytest.importorskip("tvm")


def _ort(path, ids):
    from tailor.backends.runners import OrtModel

    return OrtModel(path).run_numpy(ids.numpy())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_rewritten_onnx_model_builds_and_matches_onnxruntime(family, tiny_onnx, tmp_path, monkeypatch):
    """An ONNX input compiled to a budget with format tvm: the TVM build of the rewritten
    model.onnx gives onnxruntime's outputs, at the built shape and padded shorter inputs."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    c = tailor.compile(tiny_onnx[family], budget=0.7, prompt_len=16, batch=2, calib_windows=4,
                       calib_len=16, target="cpu", formats=("onnx", "tvm"))
    assert c.plan.rewrites and c.formats == ("onnx", "tvm")
    out = c.save(tmp_path / "art")
    info = json.loads((out / "tvm.json").read_text())
    assert info["shape"] == [2, 16] and info["max_abs_diff_vs_onnxruntime"] <= info["tolerance"]
    assert c.report["tvm"]["shape"] == [2, 16]
    tvm_model = tailor.load(out, runtime="tvm").model
    for batch, seq in ((2, 16), (1, 9)):  # the built shape, then padded up to it
        ids = ids_for(batch=batch, seq=seq, seed=seq)
        with torch.no_grad():
            got = tvm_model(ids).numpy()
        expected = _ort(out / "model.onnx", ids)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_inputs_the_build_cannot_run_are_refused(tiny_onnx, tmp_path):
    out = tailor.compile(tiny_onnx["llama"], prompt_len=8, formats=("onnx", "tvm")).save(tmp_path / "a")
    model = tailor.load(out, runtime="tvm").model
    with pytest.raises(TailorError, match="1 × 8 tokens"):
        model(ids_for(batch=1, seq=9))
    with pytest.raises(TailorError, match="token ids must lie in"):
        model(torch.full((1, 4), 10_000))
    plain = tailor.compile(tiny_onnx["llama"]).save(tmp_path / "b")
    with pytest.raises(TailorError, match="no TVM build"):
        tailor.load(plain, runtime="tvm")
    with pytest.raises(TailorError, match="unknown runtime"):
        tailor.load(out, runtime="tensorrt")


def test_torch_input_with_format_tvm_exports_onnx_first(tmp_path):
    from tests.conftest import build_model

    c = tailor.compile(build_model("gpt2"), prompt_len=8, formats=("tvm",))
    assert set(c.formats) == {"tvm", "onnx"}
    out = c.save(tmp_path / "a")
    ids = ids_for(batch=1, seq=8)
    with torch.no_grad():
        got = tailor.load(out, runtime="tvm").model(ids).numpy()
        ref = c.model(ids).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
