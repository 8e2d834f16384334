"""Sequential refit: exact where nothing changed, closer to the original where rewrites did, and
the same on a transformers model and its ONNX export."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tailor.backends.runners import HFModel, OrtModel
from tailor.passes.base import Option
from tailor.passes.measure import clone, divergence, model_outputs
from tailor.passes.profile import apply_options, collect_signals
from tailor.passes.refit import refit_sequentially, solve
from tailor.rewriter.capture import capture
from tests.conftest import ids_for

PLAN = [Option("head_prune", 0, {"kv_heads": [1], "queries": [[0, 1]]}, ()),
        Option("layer_skip", 1, {}, ())]


def test_solve_recovers_a_linear_map_and_keeps_a_missing_bias_missing():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 6))
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    t = x @ w.T + b
    xa = np.concatenate([x, np.ones((len(x), 1))], 1)
    gram, cross = xa.T @ xa / len(x), t.T @ xa / len(x)
    w2, b2 = solve(gram, cross, np.zeros_like(w), np.zeros(3), ridge=0.0)
    np.testing.assert_allclose(w2, w, atol=1e-8)
    np.testing.assert_allclose(b2, b, atol=1e-8)
    w3, b3 = solve(gram, cross, np.zeros_like(w), None, ridge=0.0)
    assert b3 is None and w3.shape == w.shape


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_refitting_an_unchanged_model_changes_nothing(tiny_models, tiny_onnx, name):
    ids = ids_for(batch=8, seq=16, seed=1)
    for source in (tiny_models[name], capture(tiny_onnx[name]).source.model):
        graph = capture(tiny_models[name] if isinstance(source, torch.nn.Module) else tiny_onnx[name]).graph
        before = model_outputs(source, ids)
        after = model_outputs(refit_sequentially(source, clone(source), graph, ids), ids)
        for a, b in zip(before, after):
            assert float((a - b).abs().max()) <= 1e-4


def test_refit_brings_a_rewritten_model_closer_and_onnx_matches_torch(tiny_models, tiny_onnx):
    model, ct, co = tiny_models["llama"], capture(tiny_models["llama"]), capture(tiny_onnx["llama"])
    calib, held = ids_for(batch=16, seq=24, seed=3), ids_for(batch=8, seq=24, seed=9)
    signals = collect_signals(model, ct.graph, calib)
    reference = model_outputs(model, held)
    torch_plan = apply_options(copy.deepcopy(model), ct.graph, PLAN, signals)
    before = divergence(reference, model_outputs(torch_plan, held), True)
    torch_refit = refit_sequentially(model, torch_plan, ct.graph, calib, removed={1})
    after = divergence(reference, model_outputs(torch_refit, held), True)
    assert after < 0.9 * before
    onnx_plan = apply_options(clone(co.source.model), co.graph, PLAN, signals)
    onnx_refit = refit_sequentially(co.source.model, onnx_plan, co.graph, calib, removed={1})
    with torch.no_grad():
        expected = HFModel(torch_refit)(held).numpy()
    assert np.abs(OrtModel(onnx_refit).run_numpy(held.numpy()) - expected).max() <= 1e-3
