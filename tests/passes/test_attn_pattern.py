"""attn_pattern: masks match their definition, the per-head pattern is what runs (torch and ONNX),
a dense plan is exact, the cost model prices density, and a budgeted plan compiles and reloads."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tailor
from tailor.core.patterns import Pattern, density, keep_mask
from tailor.core.targets import get_target
from tailor.passes.cost import CostModel, LayerShape, Structure, Workload
from tailor.rewriter.capture import capture
from tailor.rewriter.modules.sparse_attention import install
from tests.conftest import build_model, ids_for

PATTERNS = [Pattern(2, 3, 0.0), Pattern(0, 1, 0.25), Pattern(4, 0, 0.5), None]


def _by_definition(p: Pattern | None, q_len: int, k_len: int, causal: bool) -> torch.Tensor:
    out = torch.zeros(q_len, k_len, dtype=torch.bool)
    for qi in range(q_len):
        i = k_len - q_len + qi
        for j in range(k_len):
            w = int(np.floor(p.alpha + p.beta * k_len)) if p else None
            out[qi, j] = p is None or j < p.sink or (i - j if causal else abs(i - j)) < w
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,k_len", [(17, 17), (1, 23), (5, 40)])
def test_mask_matches_its_definition(causal, q_len, k_len):
    got = keep_mask(PATTERNS, q_len, k_len, causal)
    for h, p in enumerate(PATTERNS):
        assert torch.equal(got[h], _by_definition(p, q_len, k_len, causal)), (p, q_len, k_len)


@pytest.mark.parametrize("n", [16, 100, 1536])
def test_density_counts_the_mask(n):
    pats = [Pattern(4, 8, 0.0), Pattern(2, 0, 0.25), None]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    kept = sum(int((keep_mask([p], n, n, True)[0] & causal).sum()) for p in pats)
    counted = kept / (3 * int(causal.sum()))
    assert density(pats, n) == pytest.approx(float(counted), rel=1e-9)


def _reference_attention(q, k, v, patterns, causal, scale):
    """Per head, explicit softmax over the kept keys: the definition, written out."""
    hq, hk = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    n_q, n_k = q.shape[2], k.shape[2]
    for h in range(hq):
        keep = _by_definition(patterns[h // (hq // hk)], n_q, n_k, causal)
        if causal:
            keep &= torch.arange(n_k)[None] <= torch.arange(n_k - n_q, n_k)[:, None]
        s = (q[:, h] @ k[:, h // (hq // hk)].transpose(-1, -2)) * scale
        s = s.masked_fill(~keep, float("-inf"))
        out[:, h] = torch.softmax(s, -1) @ v[:, h // (hq // hk)]
    return out.transpose(1, 2)


@pytest.mark.parametrize("scores", [None, 2 * 4 * 30 * 7])  # all at once; 7 query rows at a time
@pytest.mark.parametrize("causal", [True, False])
def test_attention_function_honours_each_heads_pattern(causal, scores, monkeypatch):
    from tailor.rewriter.modules.sparse_attention import sparse_attention_forward

    if scores is not None:
        monkeypatch.setattr("tailor.rewriter.modules.sparse_attention.MASKED_SCORES", scores)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
    module = torch.nn.Module()
    module.is_causal = causal
    module.tailor_spans = [Pattern(2, 5, 0.0).to_json(), None]
    got, _ = sparse_attention_forward(module.eval(), q, k, v, None, scaling=0.3)
    want = _reference_attention(q, k, v, [Pattern(2, 5, 0.0), None], causal, 0.3)
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("block_rows", [7, 256])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len", [30, 9, 1])
def test_blocks_of_query_rows_attend_to_what_the_masked_path_does(block_rows, causal, q_len, monkeypatch):
    """The eager path (each block of query rows over the keys its pattern can keep) against the
    definition and against the traced path's whole mask, with a padding mask too: queries the
    last q_len of 30 positions, patterns whose sinks fall inside and outside the window's span."""
    from tailor.rewriter.modules import sparse_attention as sa

    monkeypatch.setattr(sa, "BLOCK_ROWS", block_rows)
    torch.manual_seed(0)
    patterns = [Pattern(2, 5, 0.0), None, Pattern(0, 3, 0.1), Pattern(9, 2, 0.0), Pattern(1, 40, 0.0)]
    q, k, v = torch.randn(2, 10, q_len, 8), torch.randn(2, 5, 30, 8), torch.randn(2, 5, 30, 8)
    module = torch.nn.Module()
    module.is_causal = causal
    module.tailor_spans = [None if p is None else p.to_json() for p in patterns]
    got, _ = sa.sparse_attention_forward(module.eval(), q, k, v, None, scaling=0.3)
    if q_len == 30:  # the definition writes the causal mask for queries at the end
        want = _reference_attention(q, k, v, patterns, causal, 0.3)
        assert (got - want).abs().max() < 1e-5
    masked = sa._attend_masked(q, k, v, patterns, None, causal, 0.3, 0.0).transpose(1, 2)
    assert (got - masked).abs().max() < 1e-5
    # left padding: the second sequence's first 4 positions (a transformers-style additive mask);
    # compared at the real queries (a padding query has no key to attend to: its output is unused)
    allowed = torch.ones(2, 1, q_len, 30, dtype=torch.bool)
    allowed &= sa._base_mask(None, q_len, 30, True, None) if causal else True
    allowed[1, :, :, :4] = False
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    got, _ = sa.sparse_attention_forward(module.eval(), q, k, v, additive, scaling=0.3)
    masked = sa._attend_masked(q, k, v, patterns, additive, causal, 0.3, 0.0).transpose(1, 2)
    real = torch.arange(30 - q_len, 30) >= 4
    assert (got - masked)[0].abs().max() < 1e-5 and (got - masked)[1, real].abs().max() < 1e-5


@pytest.mark.parametrize("t", [1, 5, 63, 100])
@pytest.mark.parametrize("sink,window", [(0, 1), (4, 16), (3, 7), (40, 10)])
def test_streaming_in_window_blocks_matches_the_masked_path_and_its_gradient(t, sink, window):
    """The retrieval gates' streaming branch (the rows in blocks of the window, one batched call)
    against the whole-mask path: output and the gradient the gates' fit takes through it; sinks
    inside and past the window, a sequence shorter than a block, one token."""
    from tailor.rewriter.modules import sparse_attention as sa

    torch.manual_seed(0)
    p = Pattern(sink, window, 0.0)
    q, k, v = (torch.randn(1, h, t, 8, dtype=torch.float64, requires_grad=True) for h in (6, 2, 2))
    weight = torch.randn(1, 6, t, 8, dtype=torch.float64)
    want = sa._attend_masked(q, k, v, [p, p], None, True, 0.3, 0.0)
    want_grads = torch.autograd.grad((want * weight).sum(), (q, k, v))
    got = sa.attend_streaming(q, k, v, p, 0.3)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    assert got.shape == want.shape and (got - want).abs().max() < 1e-10
    assert all((g - w).abs().max() < 1e-10 for g, w in zip(grads, want_grads))


def test_dense_plan_is_exact_and_a_pattern_changes_only_what_it_should():
    model = build_model("llama")
    ids = ids_for(seq=40)
    with torch.no_grad():
        ref = model(ids).logits
        dense = copy.deepcopy(model)
        for layer in dense.model.layers:
            install(dense, layer.self_attn, [None, None])
        assert torch.equal(dense(ids).logits, ref)
        sparse = copy.deepcopy(model)
        install(sparse, sparse.model.layers[1].self_attn, [Pattern(2, 4, 0.0), None])
        out = sparse(ids).logits
    # positions whose keys all lie inside sink + window are untouched, later ones are not
    assert (out[:, :6] - ref[:, :6]).abs().max() < 1e-5
    assert (out[:, 10:] - ref[:, 10:]).abs().max() > 1e-3


def test_patterned_model_exports_to_onnx_and_onnxruntime_runs_the_pattern(tmp_path):
    import onnxruntime as ort

    from tailor.backends.export import export_onnx

    model = build_model("llama")
    for layer in model.model.layers:
        install(model, layer.self_attn, [Pattern(2, 3, 0.25), None])
    path = tmp_path / "m.onnx"
    export_onnx(model, path, encoder=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seq in (24, 57):  # the window grows with the length: the exported graph must follow
        ids = ids_for(batch=1, seq=seq)
        with torch.no_grad():
            want = model(ids).logits.numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
        assert np.abs(got - want).max() < 1e-4


def test_cost_model_prices_attention_by_density():
    graph = capture(build_model("llama")).graph
    cm = CostModel(graph, Workload(1, 512, 0), get_target("h100"))
    pats = (Pattern(64, 64, 0.0), None)
    s = Structure([LayerShape(True, True, 2, 2, kv_patterns=pats) for _ in graph.blocks])
    assert cm.ratio(s, "attention") == pytest.approx(density(list(pats), 512), rel=1e-9)
    assert cm.ratio(s, "kv_memory") == pytest.approx((128 + 512) / (2 * 512), rel=1e-9)


def test_patterns_are_priced_as_the_target_runs_them():
    """A torch model's patterns run as masked SDPA except where tailor's block-sparse kernels run
    them (GPU targets): on the CPU target the prompt's attention costs what dense attention under
    a mask costs, while the per-head KV cache (tailor's generation, any device) still shrinks."""
    graph = capture(build_model("llama")).graph
    pats = (Pattern(64, 64, 0.0), None)
    sparse = Structure([LayerShape(True, True, 2, 2, kv_patterns=pats) for _ in graph.blocks])
    workload = Workload(1, 512, 0)
    gpu, cpu = (CostModel(graph, workload, get_target(t)) for t in ("h100", "cpu"))
    assert gpu.ratio(sparse, "attention") == pytest.approx(density(list(pats), 512), rel=1e-9)
    assert density(list(pats), 512) < 0.8
    assert cpu.ratio(sparse, "attention") >= 1.0   # masked: every key of every head, no causal skip
    assert cpu.ratio(sparse, "latency") >= 1.0
    assert cpu.ratio(sparse, "kv_memory") == pytest.approx(gpu.ratio(sparse, "kv_memory"))
    assert cpu.ratio(sparse, "kv_memory") < 1.0


def test_budgeted_plan_meets_density_and_reloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    model = build_model("llama")
    kwargs = dict(objective="attention", passes=["attn_pattern"], prompt_len=512, calib_windows=4,
                  calib_len=32)
    c = tailor.compile(model, budget=0.5, **kwargs)
    assert c.plan.predicted["attention"] <= 0.5 + 1e-9
    assert {r["pass"] for r in c.plan.rewrites} == {"attn_pattern"}
    assert c.report["attention_profile"]["lengths"] == [256, 512]
    ids = ids_for(batch=1, seq=300)
    with torch.no_grad():
        out = c.model(ids)
        assert (tailor.load(c.save(tmp_path / "a")).model(ids) - out).abs().max() <= 1e-5
        assert (out - model(ids).logits).abs().max() > 0  # the patterns really run
    again = tailor.compile(model, budget=0.6, **kwargs)
    assert again.report["calibration"]["cached"] and again.plan.predicted["attention"] <= 0.6 + 1e-9


def test_encoder_gets_bidirectional_patterns(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILOR_CACHE", str(tmp_path / "cache"))
    model = build_model("bert")
    c = tailor.compile(model, budget=0.7, objective="attention", passes=["attn_pattern"], prompt_len=128,
                       calib_windows=4, calib_len=32)
    assert c.plan.predicted["attention"] <= 0.7 + 1e-9 and c.plan.rewrites
    ids = ids_for(batch=1, seq=128)
    with torch.no_grad():
        assert torch.isfinite(c.model(ids)).all()
