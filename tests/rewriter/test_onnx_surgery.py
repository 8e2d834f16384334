"""The ONNX rewrites against the torch ones: the same option, applied to the exported graph with
onnx_ir and run by onnxruntime, must give what the torch rewrite gives."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import tailor
from tailor.backends import backend_for
from tailor.backends.export import export_onnx
from tailor.backends.runners import HFModel, OrtModel
from tailor.core.errors import TailorError
from tailor.passes.base import Option
from tailor.passes.profile import collect_signals
from tailor.passes.registry import apply_options, candidates_for
from tailor.rewriter.capture import capture
from tailor.rewriter.torch_surgery import replace_with_constant
from tests.conftest import build_model, ids_for

STRUCTURAL = ["layer_skip", "ffn_skip", "ffn_prune", "head_prune", "kv_share"]


def _rewritten(captured, options, signals):
    """A rewritten copy of the captured model, in its own form (transformers or onnx_ir)."""
    return apply_options(backend_for(captured).clone(), options, signals).model


def _both(tiny_models, tiny_onnx, name):
    model = tiny_models[name]
    ct, co = capture(model), capture(tiny_onnx[name])
    ids = ids_for(batch=4, seq=24, seed=3)
    return model, ct, co, ids


@pytest.mark.parametrize("name", ["llama", "mistral", "bert"])
def test_onnx_signals_equal_torch_signals(tiny_models, tiny_onnx, name):
    model, ct, co, ids = _both(tiny_models, tiny_onnx, name)
    st, so = collect_signals(backend_for(ct), ids), collect_signals(backend_for(co), ids)
    for field in ("block_influence", "ffn_contribution", "ffn_mean", "attn_mean", "kv_similarity",
                  "o_importance", "down_importance"):
        np.testing.assert_allclose(np.asarray(getattr(so, field)), np.asarray(getattr(st, field)),
                                   rtol=1e-4, atol=1e-6, err_msg=field)
    for a, b in zip(so.o_gram + so.down_gram, st.o_gram + st.down_gram):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "bert"])
def test_every_option_rewrites_onnx_like_torch(tiny_models, tiny_onnx, name):
    model, ct, co, ids = _both(tiny_models, tiny_onnx, name)
    signals = collect_signals(backend_for(ct), ids)
    torch_opts = candidates_for(ct.graph, signals, STRUCTURAL)
    onnx_opts = {o.key: o for o in candidates_for(co.graph, signals, STRUCTURAL)}
    # ONNX offers everything torch does (and, for post-norm blocks, more: see below)
    assert {o.key for o in torch_opts} <= set(onnx_opts)
    assert {o.pass_name for o in torch_opts} >= {"layer_skip", "ffn_prune", "head_prune"}
    for o in torch_opts:
        with torch.no_grad():
            expected = HFModel(_rewritten(ct, [o], signals))(ids).numpy()
        rewritten = _rewritten(co, [onnx_opts[o.key]], signals)
        got = OrtModel(rewritten).run_numpy(ids.numpy())
        assert got.shape == expected.shape, o.key
        assert np.abs(got - expected).max() <= 1e-4, o.key


def test_a_combined_plan_rewrites_onnx_like_torch(tiny_models, tiny_onnx):
    model, ct, co, ids = _both(tiny_models, tiny_onnx, "mistral")
    signals = collect_signals(backend_for(ct), ids)
    chosen = [Option("head_prune", 0, {"kv_heads": [1], "queries": [[0, 2]]}, ()),
              Option("ffn_prune", 0, {"channels": list(range(0, 96, 2))}, ()),
              Option("kv_share", 2, {"source": 1}, ()),
              Option("ffn_skip", 1, {}, ())]
    with torch.no_grad():
        expected = HFModel(_rewritten(ct, chosen, signals))(ids).numpy()
    rewritten = _rewritten(co, chosen, signals)
    assert np.abs(OrtModel(rewritten).run_numpy(ids.numpy()) - expected).max() <= 1e-4
    # the removed weights are gone from the graph, not just unused
    sizes = {v.name: v.const_value.size for v in rewritten.graph.initializers.values()}
    original = sum(v.const_value.size for v in co.source.model.graph.initializers.values())
    assert sum(sizes.values()) < original


def _fused_ops(model, tmp_path) -> dict[str, int]:
    """Op counts of the graph onnxruntime runs after its own fusions."""
    import collections

    import onnx
    import onnxruntime as ort
    from onnx_ir import serde

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(serde.serialize_model(model).SerializeToString(), so,
                         providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_rewritten_onnx_keeps_onnxruntime_fusions(tiny_models, tiny_onnx, tmp_path):
    # the rewrite re-infers shapes with the batch and sequence names: without them onnxruntime
    # cannot prove a residual add's inputs alike and leaves Add + LayerNormalization unfused
    model, ct, co, ids = _both(tiny_models, tiny_onnx, "bert")
    signals = collect_signals(backend_for(ct), ids)
    chosen = [Option("head_prune", 0, {"kv_heads": [0, 2], "queries": [[0], [0]]}, ()),
              Option("ffn_prune", 1, {"channels": list(range(0, 64, 2))}, ())]
    rewritten = _rewritten(co, chosen, signals)
    before, after = _fused_ops(co.source.model, tmp_path), _fused_ops(rewritten, tmp_path)
    assert before["SkipLayerNormalization"] > 0
    assert after["SkipLayerNormalization"] == before["SkipLayerNormalization"]
    assert after["LayerNormalization"] == before["LayerNormalization"]


def test_skips_beside_blocks_other_passes_rewrote(tiny_models, tiny_onnx):
    # a layer skip after an FFN skip and a dropped attention elsewhere: the branches those made
    # constant have lost their residual Adds, which the skip must not need to find
    model, ct, co, ids = _both(tiny_models, tiny_onnx, "llama")
    signals = collect_signals(backend_for(ct), ids)
    chosen = [Option("head_prune", 0, {"kv_heads": [], "queries": []}, ()),
              Option("ffn_skip", 0, {}, ()),
              Option("layer_skip", 1, {}, ())]
    with torch.no_grad():
        expected = HFModel(_rewritten(ct, chosen, signals))(ids).numpy()
    rewritten = _rewritten(co, chosen, signals)
    assert np.abs(OrtModel(rewritten).run_numpy(ids.numpy()) - expected).max() <= 1e-4


def test_adjacent_layer_skips_on_onnx(tiny_models, tiny_onnx):
    model, ct, co, ids = _both(tiny_models, tiny_onnx, "llama")
    chosen = [Option("layer_skip", 1, {}, ()), Option("layer_skip", 2, {}, ())]
    with torch.no_grad():
        expected = HFModel(_rewritten(ct, chosen, None))(ids).numpy()
    rewritten = _rewritten(co, chosen, None)
    assert np.abs(OrtModel(rewritten).run_numpy(ids.numpy()) - expected).max() <= 1e-4


def test_post_norm_drop_attention_on_onnx_keeps_the_residual(tiny_models, tiny_onnx):
    """BERT's attention branch made constant keeps the residual add and the norm after it (on
    torch the attention module holds those too, so there the option is not offered)."""
    model, ct, co, ids = _both(tiny_models, tiny_onnx, "bert")
    signals = collect_signals(backend_for(co), ids)
    drop = Option("head_prune", 1, {"kv_heads": [], "queries": []}, ())
    rewritten = _rewritten(co, [drop], signals)
    expected_model = copy.deepcopy(model)  # by hand: only the output projection becomes the mean
    replace_with_constant(expected_model, "encoder.layer.1.attention.output.dense", 64, returns_tuple=False,
                          mean=signals.attn_mean[1])
    with torch.no_grad():
        expected = HFModel(expected_model)(ids).numpy()
    assert np.abs(OrtModel(rewritten).run_numpy(ids.numpy()) - expected).max() <= 1e-4


def test_gpt2_ffn_pruning_on_onnx_rewrites_flattening_shapes(tmp_path):
    """GPT-2's Conv1D exports flatten to [-1, width] between the FFN's projections: pruning dead
    channels there must fix those shapes and stay exact."""
    model = build_model("gpt2")
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight[:, 192:] = 0   # Conv1D weight [in, out]
            block.mlp.c_fc.bias[192:] = 0        # gelu(0) = 0: the channels are dead
    path = tmp_path / "gpt2.onnx"
    export_onnx(model, path, encoder=False)
    co = capture(path)
    ids = ids_for(batch=4, seq=24, seed=3)
    signals = collect_signals(backend_for(co), ids)
    keep = Option("ffn_prune", 1, {"channels": list(range(192))}, ())
    rewritten = _rewritten(co, [keep], signals)
    ref = OrtModel(co.source.model).run_numpy(ids.numpy())
    assert np.abs(OrtModel(rewritten).run_numpy(ids.numpy()) - ref).max() <= 1e-4


def test_compile_an_onnx_model_under_budget(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    ids = ids_for(batch=1, seq=600, seed=9)[0].tolist()
    calib = tmp_path / "ids.json"
    calib.write_text(json.dumps(ids))
    opt = tailor.compile(tiny_onnx["llama"], 0.6, objective="flops", prompt_len=64, calib=calib,
                         calib_len=32, calib_windows=8, target="cpu")
    assert opt.plan.predicted["flops"] <= 0.6
    assert {r["pass"] for r in opt.plan.rewrites} <= set(STRUCTURAL)
    out = opt.save(tmp_path / "out")
    probe = ids_for(batch=2, seq=16, seed=1)
    with torch.no_grad():
        expected = opt.model(probe).numpy()
    assert np.abs(OrtModel(out / "model.onnx").run_numpy(probe.numpy()) - expected).max() <= 1e-5
    assert opt.report["calibration"]["data"].startswith(str(calib))
    # the sequential refit is kept only where the held-out windows say it helped
    refit = opt.report["refit"]
    assert refit["kept"] == (refit["measured_kl_heldout_after"] < refit["measured_kl_heldout_before"])
    assert opt.report["search"]["measured_kl_heldout"] >= refit["measured_kl_heldout"] - 1e-12


def test_onnx_input_errors(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "ids.json"
    bad.write_text(json.dumps([1, 2, 5000]))
    with pytest.raises(TailorError, match="outside the model's vocabulary"):
        tailor.compile(tiny_onnx["llama"], 0.5, calib=bad)
    bad.write_text(json.dumps({"ids": [1]}))
    with pytest.raises(TailorError, match="JSON list of token ids"):
        tailor.compile(tiny_onnx["llama"], 0.5, calib=bad)
