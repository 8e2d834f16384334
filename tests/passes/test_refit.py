"""Sequential refit: exact where nothing changed, closer to the original where rewrites did, and
the same on a transformers model and its ONNX export."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tailor.backends import backend_for
from tailor.backends.base import divergence
from tailor.backends.runners import HFModel, OrtModel
from tailor.passes.base import Option
from tailor.passes.profile import collect_signals
from tailor.passes.refit import refit_sequentially
from tailor.passes.registry import apply_options
from tailor.rewriter.capture import capture
from tests.conftest import ids_for

PLAN = [Option("head_prune", 0, {"kv_heads": [1], "queries": [[0, 1]]}, ()),
        Option("layer_skip", 1, {}, ())]


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_refitting_an_unchanged_model_changes_nothing(tiny_models, tiny_onnx, name):
    ids = ids_for(batch=8, seq=16, seed=1)
    for source in (backend_for(capture(tiny_models[name])), backend_for(capture(tiny_onnx[name]))):
        before = source.outputs(ids)
        after = refit_sequentially(source, source.clone(), ids).outputs(ids)
        for a, b in zip(before, after):
            assert float((a - b).abs().max()) <= 1e-4


def test_refit_brings_a_rewritten_model_closer_and_onnx_matches_torch(tiny_models, tiny_onnx):
    bt, bo = backend_for(capture(tiny_models["llama"])), backend_for(capture(tiny_onnx["llama"]))
    calib, held = ids_for(batch=16, seq=24, seed=3), ids_for(batch=8, seq=24, seed=9)
    signals = collect_signals(bt, calib)
    reference = bt.outputs(held)
    torch_plan = apply_options(bt.clone(), PLAN, signals)
    before = divergence(reference, torch_plan.outputs(held), True)
    torch_refit = refit_sequentially(bt, torch_plan, calib, removed={1})
    after = divergence(reference, torch_refit.outputs(held), True)
    assert after < 0.9 * before
    onnx_plan = apply_options(bo.clone(), PLAN, signals)
    onnx_refit = refit_sequentially(bo, onnx_plan, calib, removed={1})
    with torch.no_grad():
        expected = HFModel(torch_refit.model)(held).numpy()
    assert np.abs(OrtModel(onnx_refit.model).run_numpy(held.numpy()) - expected).max() <= 1e-3
