"""Block-sparse ONNX attention (onnx_sparse_attention) against the masked-SDPA reference that
the torch rewrite runs: same patterns, same outputs; and what the profile and cost model make of it."""
from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch

from tailor.backends import backend_for
from tailor.backends.runners import HFModel, OrtModel, cpu_session
from tailor.core.errors import TailorError
from tailor.core.patterns import Pattern
from tailor.core.targets import get_target
from tailor.passes import attn_pattern
from tailor.passes.attention_profile import profile_attention
from tailor.passes.cost import CostModel, Workload
from tailor.passes.registry import apply_options
from tailor.rewriter import onnx_surgery
from tailor.rewriter.capture import capture
from tailor.rewriter.onnx_sparse_attention import block_size, blocked_keys, substitute
from tests.conftest import ids_for

P = Pattern.from_json
# one pattern everywhere; one head patterned, the rest dense; two patterns (sink 0, growing window)
SPANS = {
    "uniform": lambda kv: [[2, 3.0, 0.0]] * kv,
    "one_head": lambda kv: [[1, 4.0, 0.25]] + [None] * (kv - 1),
    "two_patterns": lambda kv: [[0, 2.0, 0.0]] + [[3, 1.0, 0.1]] * (kv - 1),
}


def _options(graph, spans):
    patterns = [P(s) if s else None for s in spans]
    return [attn_pattern._spans(layer, patterns) for layer in range(graph.num_layers)]


@pytest.mark.parametrize("name", ["llama", "mistral", "bert"])
@pytest.mark.parametrize("kind", list(SPANS))
@pytest.mark.parametrize("seq", [24, 37])
def test_blocked_onnx_attention_matches_masked_reference(tiny_models, tiny_onnx, name, kind, seq):
    model, ct, co = tiny_models[name], capture(tiny_models[name]), capture(tiny_onnx[name])
    spans = SPANS[kind](ct.graph.blocks[0].attn.num_kv_heads)
    ids = ids_for(batch=2, seq=seq, seed=3)
    with torch.no_grad():
        patterned = apply_options(backend_for(ct).clone(), _options(ct.graph, spans), None).model
        expected = HFModel(patterned)(ids)
        dense = HFModel(model)(ids)
    rewritten = apply_options(backend_for(co).clone(), _options(co.graph, spans), None).model
    got = OrtModel(rewritten).run_numpy(ids.numpy())
    assert np.abs(got - expected.numpy()).max() <= 1e-4
    assert (dense - expected).abs().max() > 1e-3  # the patterns do change the output
    # one NaN guard a layer: the one capture's clean-up moved after the core, none added to it
    assert sum(n.op_type == "IsNaN" for n in rewritten.graph) == co.graph.num_layers


def test_blocked_encoder_attention_honours_padding(tiny_models, tiny_onnx):
    """Padded keys stay masked inside the gathered blocks; an all-padding row gives what the
    original graph gives (its NaN guard: zeros)."""
    ct, co = capture(tiny_models["bert"]), capture(tiny_onnx["bert"])
    spans = SPANS["two_patterns"](ct.graph.blocks[0].attn.num_kv_heads)
    ids = ids_for(batch=3, seq=29, seed=5)
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    mask[1, 3:] = 0
    with torch.no_grad():
        patterned = apply_options(backend_for(ct).clone(), _options(ct.graph, spans), None).model
        expected = patterned(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    rewritten = apply_options(backend_for(co).clone(), _options(co.graph, spans), None).model
    session = cpu_session(ir.serde.serialize_model(rewritten).SerializeToString())
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    valid = mask.bool().numpy()
    assert np.abs(got[valid] - expected[valid]).max() <= 1e-4
    assert np.isfinite(got).all()


def test_onnx_attention_profile_equals_torch_profile(tiny_models, tiny_onnx):
    """The same model measured through its ONNX export (rewritten per head, onnxruntime) and
    through transformers: the same losses."""
    ct, co = capture(tiny_models["llama"]), capture(tiny_onnx["llama"])
    grid = [P([2, 4.0, 0.0]), P([0, 8.0, 0.0]), P([4, 2.0, 0.125])]
    texts = {24: ids_for(batch=3, seq=24, seed=7), 40: ids_for(batch=2, seq=40, seed=8)}
    kw = dict(retrieval_weight=0.0, progress=False)
    t = profile_attention(backend_for(ct), texts, {}, grid, **kw)
    o = profile_attention(backend_for(co), texts, {}, grid, **kw)
    assert t.measured == o.measured > 0
    for n in texts:
        assert t.loss[n].max() > 1e-4  # the patterns cost something (tiny random model: little)
        np.testing.assert_allclose(o.loss[n], t.loss[n], rtol=1e-3, atol=1e-6)


def test_cost_model_prices_onnx_blocks_not_torch_masks(tiny_models, tiny_onnx):
    """On an ONNX graph a pattern's core costs its gathered blocks; a torch model's decomposed
    (eager) core computes every score whatever the mask."""
    co = capture(tiny_onnx["llama"])
    g = co.graph
    w = Workload(batch=1, prompt_len=512)
    cm = CostModel(g, w, get_target("cpu"))
    a = g.blocks[0].attn
    p = P([4, 32.0, 0.0])
    dense = cm.attention_core(a, a.num_heads // a.num_kv_heads, [None] * a.num_kv_heads, True)
    sparse = cm.attention_core(a, a.num_heads // a.num_kv_heads, [p] * a.num_kv_heads, True)
    assert sparse.attn_flops / dense.attn_flops == pytest.approx(blocked_keys(p, 512, True) / 512)
    assert blocked_keys(p, 512, True) == 4 + 32 + block_size(p)
    torch_graph = copy.copy(g)
    torch_graph.backend = "torch"
    masked = CostModel(torch_graph, w, get_target("cpu"))
    assert masked.attention_core(a, 2, [p] * a.num_kv_heads, True).attn_flops == \
        masked.attention_core(a, 2, [None] * a.num_kv_heads, True).attn_flops


def test_fused_attention_has_no_sparse_form(tiny_onnx):
    co = capture(tiny_onnx["llama"])
    a = copy.copy(co.graph.blocks[0].attn)
    a.kind = "sdpa"
    with pytest.raises(TailorError, match="decomposed"):
        substitute(onnx_surgery.clone(co.source.model), a, [P([2, 4.0, 0.0])] * a.num_kv_heads)


def test_onnx_compile_offers_patterns_only_where_they_can_pay(tiny_onnx):
    """Profiling patterns on ONNX runs the whole model per head and pattern: by default it is
    skipped (and the report says why) where the cheapest patterns would save under 10%."""
    import tailor
    from tailor.passes.attn_pattern import default_grid
    from tailor.stages.cost import MIN_PATTERN_HEADROOM, pattern_headroom

    g = capture(tiny_onnx["llama"]).graph
    short, long = (CostModel(g, Workload(batch=1, prompt_len=n), get_target("cpu")) for n in (16, 512))
    assert pattern_headroom(short, g, default_grid(16), "latency") < MIN_PATTERN_HEADROOM
    assert pattern_headroom(long, g, default_grid(512), "latency") > MIN_PATTERN_HEADROOM
    opt = tailor.compile(tiny_onnx["llama"], 0.8, prompt_len=16, target="cpu", calib_windows=8,
                         use_cache=False, formats=("onnx",))
    assert "narrowest pattern" in opt.report["attn_pattern_skipped"]
    assert all(r["pass"] != "attn_pattern" for r in opt.plan.to_json()["rewrites"])
