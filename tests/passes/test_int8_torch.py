"""The int8 pass on torch models: projections on PyTorch's dynamic quantization (Int8Linear) on
the CPU, float weights kept for refits and the artifact, quantized again by tailor.load."""
from __future__ import annotations

import json

import pytest
import torch

import tailor
from tailor.backends import backend_for
from tailor.core.errors import TailorError
from tailor.core.targets import get_target
from tailor.passes.cost import CostModel, Workload
from tailor.passes.int8 import int8_refusal
from tailor.passes.registry import PASSES, apply_options
from tailor.rewriter.capture import capture
from tailor.rewriter.modules.int8_linear import Int8Linear
from tailor.rewriter.torch_surgery import module_path, replace_weights
from tests.conftest import build_model, ids_for
from tests.passes.test_int8 import TABLE


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "int8-cpu.json"
    path.write_text(json.dumps(TABLE))
    return str(path)


def _projections(graph):
    return [p for b in graph.blocks for p in (*b.attn.projections, *b.ffn.projections)]


def test_int8_linear_matches_the_float_product_and_repacks_after_a_change():
    torch.manual_seed(0)
    float_linear = torch.nn.Linear(64, 48)
    q = Int8Linear(64, 48)
    q.load_state_dict(float_linear.state_dict())
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        error = float((q(x) - float_linear(x)).norm() / float_linear(x).norm())
    assert 0 < error < 0.02   # quantized (not identical), yet close
    with torch.no_grad():
        q.load_state_dict({"weight": float_linear.weight * 2, "bias": float_linear.bias})  # in place
        expected = torch.nn.functional.linear(x, float_linear.weight * 2, float_linear.bias)
        assert float((q(x) - expected).norm() / expected.norm()) < 0.02
        assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_int8_branches_stay_close_and_keep_the_float_weights():
    """Every branch INT8: each projection an Int8Linear over the same float Parameters (the clone's
    original untouched), logits within INT8's error, and a refit's new weights keep the class."""
    model = build_model("llama")
    cap = capture(model)
    dense = backend_for(cap)
    variant = apply_options(dense.clone(), PASSES["int8"].candidates(cap.graph, None), None)
    paths = [module_path(p.weight.name) for p in _projections(cap.graph)]
    assert all(isinstance(variant.model.get_submodule(p), Int8Linear) for p in paths)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert all(variant.model.get_submodule(p).weight.data_ptr() == model.get_submodule(p).weight.data_ptr()
               for p in paths)   # the same storage: not copied
    assert variant.model.state_dict().keys() == model.state_dict().keys()
    ids = ids_for(cap.graph.vocab_size, batch=2, seq=16)
    with torch.no_grad():
        ref, out = dense.runnable()(ids).double(), variant.runnable()(ids).double()
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05
    lin = variant.model.get_submodule(paths[0])
    replace_weights(variant.model, paths[0], lin.weight.detach() * 0.5, None)
    assert isinstance(variant.model.get_submodule(paths[0]), Int8Linear)


def test_int8_refused_where_torch_cannot_run_it(table):
    model = build_model("llama")
    cap = capture(model)
    dense, workload = backend_for(cap), Workload(1, 64, 0)
    cost_model = CostModel(cap.graph, workload, get_target(table))
    assert int8_refusal(dense, cost_model) is None
    assert "format safetensors, not onnx" in int8_refusal(dense, cost_model, ("safetensors", "onnx"))
    assert "not hf" in int8_refusal(dense, cost_model, ("safetensors", "hf"))  # no standard config says it
    assert "calibrate-target" in int8_refusal(dense, CostModel(cap.graph, workload, get_target("cpu")))
    half = capture(build_model("llama").to(torch.bfloat16))
    assert "float32" in int8_refusal(backend_for(half), cost_model)
    with pytest.raises(TailorError, match="float32"):
        apply_options(backend_for(half), PASSES["int8"].candidates(half.graph, None)[:1], None)


def test_lm_head_int8_keeps_the_tied_embedding_float():
    """The head's option alone: the head runs INT8 while the embedding it is tied to stays a float
    lookup of the same Parameter; measured as an option, only the head is copied (from the layer
    after the last block)."""
    model = build_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    cap = capture(model)
    dense = backend_for(cap)
    head = [o for o in PASSES["int8"].candidates(cap.graph, None) if o.choice["branch"] == "lm_head"]
    variant = apply_options(dense.clone(from_layer=cap.graph.num_layers), head, None)
    m = variant.model
    assert isinstance(m.lm_head, Int8Linear) and type(m.model.embed_tokens) is torch.nn.Embedding
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # one float copy
    assert all(a is b for a, b in zip(m.model.layers, model.model.layers))  # blocks not copied
    ids = ids_for(cap.graph.vocab_size, batch=2, seq=16)
    ref, out = dense.runnable()(ids).double(), variant.runnable()(ids).double()
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05


def test_compile_with_int8_saves_float_weights_that_load_quantized(table, tmp_path, monkeypatch):
    """A measured CPU table with an INT8 figure: a torch model's plan takes INT8 (priced by the
    table alone, no fit: this tiny model's variants are too small to time), is refitted with its INT8 branches
    kept, saved as float safetensors, and tailor.load runs the same quantized model."""
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    from tailor.stages import cost

    monkeypatch.setattr(cost, "fit_variants", lambda graph, workload, int8=False: {})
    model = build_model("llama")
    compiled = tailor.compile(model, 0.45, target=table, prompt_len=64, calib_windows=4, calib_len=32)
    int8 = [r for r in compiled.plan.rewrites if r["pass"] == "int8"]
    assert int8 and compiled.report["int8"]["method"].startswith("PyTorch dynamic quantization")
    assert compiled.plan.predicted["latency"] <= 0.45 + 1e-6
    quantized = [m for m in compiled.model.modules() if isinstance(m, Int8Linear)]
    assert len(quantized) >= 3 * len(int8)   # an FFN branch has 3 projections, attention 4
    out = compiled.save(tmp_path / "artifact")
    loaded = tailor.load(out)
    assert sum(isinstance(m, Int8Linear) for m in loaded.model.modules()) == len(quantized)
    ids = ids_for(compiled.graph.vocab_size, batch=1, seq=32)
    torch.testing.assert_close(loaded.model(ids), compiled.model(ids), atol=1e-5, rtol=1e-5)
