"""Sequential refit: exact where nothing changed, closer to the original where rewrites did, and
the same on a transformers model and its ONNX export."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tailor.backends import backend_for
from tailor.backends.base import BranchSums, divergence
from tailor.backends.runners import HFModel, OrtModel
from tailor.backends.torch_backend import TorchBackend
from tailor.passes.base import Option
from tailor.passes.profile import collect_signals
from tailor.passes.refit import refit_sequentially
from tailor.passes.registry import apply_options
from tailor.rewriter.capture import capture
from tests.conftest import build_model, ids_for

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


SHARED_PLANS = {
    "llama": ([Option("head_prune", 0, {"kv_heads": [1], "queries": [[0, 1]]}, ()),
               Option("ffn_prune", 0, {"channels": list(range(0, 96, 2))}, ()),
               Option("layer_skip", 1, {}, ()),
               Option("ffn_skip", 2, {}, ())], {1}),
    # biased projections: compensation and the shapes-only bias replace existing biases
    "bert": ([Option("ffn_prune", 0, {"channels": list(range(0, 96, 2))}, ()),
              Option("ffn_prune", 2, {"channels": list(range(48))}, ())], set()),
}


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_rewrites_and_the_refit_leave_weights_shared_with_the_dense_model_untouched(name):
    """A clone may share its unchanged Parameters with the dense model: every edit and the refit's
    write must put new Parameters in place, never write into the shared ones."""
    model = build_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = backend_for(capture(model))
    ids = ids_for(batch=8, seq=16, seed=2)
    plan, removed = SHARED_PLANS[name]
    for signals in (collect_signals(dense, ids), None):
        shared = copy.deepcopy(model, memo={id(p): p for p in model.parameters()})
        assert next(shared.parameters()) is next(model.parameters())
        rewritten = apply_options(TorchBackend(shared, dense.graph), plan, signals)
        refit_sequentially(dense, rewritten, ids, removed=removed)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_branch_sums_of_numpy_or_torch_batches_are_the_numpy_reference_s_moments():
    """E[x̃x̃ᵀ] and E[t x̃ᵀ] summed blockwise in float64, from numpy (onnxruntime) or torch batches
    of any float dtype, against the concatenated [x | 1] the numpy implementation multiplied."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(2, 5, 6)) + 0.5 for _ in range(3)]
    ts = [rng.normal(size=(2, 5, 4)) for _ in range(3)]
    for convert in (lambda a: a.astype(np.float32), lambda a: torch.from_numpy(a).to(torch.bfloat16)):
        sums = BranchSums()
        for x, t in zip(xs, ts):
            sums.add(convert(x), convert(t))

        def rows(arrays):
            """The batches' tokens as float64, at the precision they were given in."""
            return np.concatenate([np.asarray(torch.as_tensor(convert(a)).double()).reshape(10, -1)
                                   for a in arrays])

        xa, t = np.concatenate([rows(xs), np.ones((30, 1))], 1), rows(ts)
        gram, cross = sums.means()
        assert gram.dtype == cross.dtype == torch.float64
        np.testing.assert_allclose(gram.numpy(), xa.T @ xa / 30, rtol=1e-12)
        np.testing.assert_allclose(cross.numpy(), t.T @ xa / 30, rtol=1e-12)


def test_refit_of_an_int8_model_fits_on_its_quantized_activations(tiny_onnx):
    """Every branch INT8: the refit reads each branch's inputs from the model as it runs
    (quantized), so it takes up the INT8 error of the projections before it and the deployed
    model comes closer to the float original on held-out inputs (fitted on the float model's
    own activations it would return the weights it started from)."""
    from tailor.passes.registry import PASSES

    dense = backend_for(capture(tiny_onnx["llama"]))
    calib, held = ids_for(batch=16, seq=24, seed=3), ids_for(batch=8, seq=24, seed=9)
    int8 = apply_options(dense.clone(), PASSES["int8"].candidates(dense.graph, None), None)
    reference = dense.outputs(held)
    before = divergence(reference, int8.outputs(held), True)
    refit = refit_sequentially(dense, int8.clone(), calib)
    assert "MatMulInteger" in {n.op_type for n in refit.deployed().graph}
    # 0.95 of it here; fitted on the float activations the ratio was 1.0000
    assert divergence(reference, refit.outputs(held), True) < 0.98 * before
