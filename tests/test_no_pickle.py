"""Loading never unpickles, and the same inputs give the same plan, byte for byte."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import tailor
from tailor.cli.main import optimize_main
from tests.conftest import ids_for

SMALL = ["--budget", "0.6", "--calib-windows", "4", "--calib-len", "32", "--prompt-len", "64"]


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every way to unpickle raises: a call anywhere fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    class Refused(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (np, "load")]:
        monkeypatch.setattr(mod, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refused)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_compile_save_and_load_never_unpickle(family, tiny_hf_dirs, tmp_path, monkeypatch, no_unpickling):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert optimize_main([str(tiny_hf_dirs[family]), "-o", str(out), *SMALL]) == 0
    assert optimize_main([str(tiny_hf_dirs[family]), "-o", str(tmp_path / "again"), *SMALL]) == 0  # cached
    with torch.no_grad():
        assert torch.isfinite(tailor.load(out).model(ids_for())).all()


def test_onnx_compile_never_unpickles(tiny_onnx, tmp_path, monkeypatch, no_unpickling):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    assert optimize_main([str(tiny_onnx["llama"]), "-o", str(tmp_path / "out"), *SMALL]) == 0
    tailor.load(tmp_path / "out")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_same_inputs_same_plan_bytes(family, tiny_hf_dirs, tmp_path, monkeypatch):
    """Two runs with nothing shared (each its own profile cache) write identical plan.json files."""
    plans = []
    for run in ("a", "b"):
        monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / f"cache-{run}"))
        assert optimize_main([str(tiny_hf_dirs[family]), "-o", str(tmp_path / run), *SMALL]) == 0
        plans.append((tmp_path / run / "plan.json").read_bytes())
    assert b'"rewrites": []' not in plans[0]
    assert plans[0] == plans[1]
