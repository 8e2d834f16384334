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


@pytest.mark.slow   # ~60 s on a 2-core CPU: every heavy kernel's hand schedule is timed, then sampled
def test_tuned_build_matches_onnxruntime_and_reuses_its_records(tiny_onnx, tmp_path):
    """tune_trials: the heavy kernels get MetaSchedule samples, the build still matches onnxruntime,
    and writing the artifact again reuses the stored records instead of sampling anew."""
    c = tailor.compile(tiny_onnx["llama"], prompt_len=8, formats=("onnx", "tvm"), tune_trials=6)
    out = c.save(tmp_path / "a")
    first = json.loads((out / "tvm.json").read_text())
    tuning = first["tuning"]
    assert tuning["trials"] == 6 and tuning["kernels_tuned"] >= 1 and tuning["kernels_reused"] == 0
    assert first["max_abs_diff_vs_onnxruntime"] <= first["tolerance"]
    kernels = json.loads((out / "tvm-tune.json").read_text())["kernels"]
    assert len(kernels) == tuning["kernels_tuned"]
    assert all(k["hand_ms"] is not None and k["ms"] <= k["hand_ms"] for k in kernels.values())
    ids = ids_for(batch=1, seq=8, seed=3)
    expected = _ort(out / "model.onnx", ids)
    got = tailor.load(out, runtime="tvm").model(ids).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())

    out = c.save(tmp_path / "a", force=True)   # the same graph again: every kernel is in the records
    again = json.loads((out / "tvm.json").read_text())["tuning"]
    assert again["trials"] == 0 and again["kernels_tuned"] == 0
    assert again["kernels_reused"] == tuning["kernels_tuned"]
    assert json.loads((out / "tvm-tune.json").read_text())["kernels"] == kernels


@pytest.mark.parametrize("trials", [-1, 2.5, "8"])
def test_bad_tune_trials_are_refused(trials, tiny_onnx):
    with pytest.raises(TailorError, match="whole number"):
        tailor.compile(tiny_onnx["llama"], prompt_len=8, formats=("onnx", "tvm"), tune_trials=trials)


def test_tune_trials_need_format_tvm(tiny_onnx, tmp_path, capsys):
    from tailor.cli.main import optimize_main

    with pytest.raises(TailorError, match="add format tvm"):
        tailor.compile(tiny_onnx["llama"], prompt_len=8, tune_trials=4)
    assert optimize_main([str(tiny_onnx["llama"]), "-o", str(tmp_path / "o"), "--tune-trials", "-3",
                          "--format", "onnx,tvm"]) == 2
    assert "whole number" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # argparse: not an integer
        optimize_main([str(tiny_onnx["llama"]), "-o", str(tmp_path / "o"), "--tune-trials", "many"])
    assert "invalid int value" in capsys.readouterr().err


def test_records_of_another_cpu_or_tvm_are_not_reused(tmp_path):
    import tvm

    from tailor.codegen.tvm.build import host_target
    from tailor.codegen.tvm.tune import read_records, write_records

    target, path = host_target(), tmp_path / "tvm-tune.json"
    kernels = {"ab12": {"task": "matmul", "record": None, "ms": 1.0, "hand_ms": 1.0}}
    write_records(path, kernels, target)
    assert read_records(path, target) == kernels
    stored = json.loads(path.read_text())
    for key, other in (("target", "skylake-avx512"), ("tvm", "0.26.0")):
        path.write_text(json.dumps(stored | {key: other}))
        assert read_records(path, target) == {}
    assert stored["tvm"] == tvm.__version__
    path.write_text("{not json")
    with pytest.raises(TailorError, match="unreadable tuning records"):
        read_records(path, target)
