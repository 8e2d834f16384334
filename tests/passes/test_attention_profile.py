"""The attention profile's proxy (tailor.backends.attention_proxy) and what the profile makes of it:
zero where a pattern is dense, ordered by containment, the block-by-block computation equal to
the full attention of the model's own function, a monotone map, measured cells kept as measured."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tailor.backends import backend_for
from tailor.backends.attention_proxy import output_factor, pattern_errors
from tailor.backends.base import ProfileBatch
from tailor.core.patterns import Pattern
from tailor.passes.attention_profile import LOSSLESS, contains, monotone_map, profile_attention
from tailor.passes.attn_pattern import default_grid
from tailor.rewriter.capture import capture
from tailor.rewriter.modules.sparse_attention import sparse_attention_forward
from tests.conftest import build_model, ids_for

N = 96


@pytest.fixture(scope="module")
def llama():
    return backend_for(capture(build_model("llama")))


def _recorded(backend, batch: ProfileBatch, grid: list[Pattern]) -> np.ndarray:
    runner = backend.pattern_runner()
    with runner.active():
        runner.record(batch, grid)
    return batch.proxy


def test_proxy_is_zero_where_dense_and_ordered_by_containment(llama):
    grid = default_grid(N) + [Pattern(4, N, 0.0)]  # the last keeps every key at N
    proxy = _recorded(llama, ProfileBatch(ids_for(batch=2, seq=N, seed=3), 1.0, None), grid)
    assert proxy.shape == (3, 2, len(grid)) and proxy.dtype == np.float64
    assert (proxy[:, :, -1] == 0).all() and (proxy[:, :, :-1] > 0).all()
    pairs = [(i, j) for i, p in enumerate(grid) for j, q in enumerate(grid) if i != j and contains(p, q, N)]
    assert len(pairs) > 20
    for outer, inner in pairs:  # as computed, before the profile's envelope
        assert (proxy[:, :, outer] <= proxy[:, :, inner] * (1 + 1e-6)).all(), (grid[outer], grid[inner])


def test_retrieval_rows_are_the_answers(llama):
    """Only the rows predicting the answers count: a pattern that changes nothing there costs nothing."""
    ids = ids_for(batch=2, seq=N, seed=4)
    batch = ProfileBatch(ids, 1.0, [3, 2])
    blocks, weights = batch.proxy_rows(1024, 128, "cpu")
    assert blocks == [(N - 4, N - 1)]
    assert weights[0, N - 4:N - 1].tolist() == pytest.approx([1 / 6] * 3)
    assert weights[1, N - 3:N - 1].tolist() == pytest.approx([1 / 4] * 2)
    assert float(weights.sum()) == pytest.approx(1.0) and int((weights > 0).sum()) == 5
    # a window reaching every key from the answers' rows (only the last row loses the first key)
    proxy = _recorded(llama, batch, [Pattern(0, N - 1, 0.0), Pattern(0, 8, 0.0)])
    assert (proxy[:, :, 0] == 0).all() and (proxy[:, :, 1] > 0).all()


def test_long_text_samples_spread_blocks():
    batch = ProfileBatch(torch.zeros(1, 4096, dtype=torch.long), 1.0, None)
    blocks, weights = batch.proxy_rows(1024, 128, "cpu")
    assert len(blocks) == 8 and blocks[0] == (0, 128) and blocks[-1] == (4096 - 128, 4096)
    assert all(b[0] >= a[1] for a, b in zip(blocks, blocks[1:]))
    assert int((weights > 0).sum()) == 1024 and float(weights.sum()) == pytest.approx(1.0)


def _reference(q, k, v, patterns, causal, scale, o_weight, mask=None):
    """Each KV head alone on each pattern through the model's attention function, whole [T, T]
    maps: the squared change of the output projection, [kv_heads, patterns, B, T]."""
    module = torch.nn.Module().eval()
    module.is_causal = causal
    hkv = k.shape[1]
    module.num_key_value_groups = q.shape[1] // hkv  # what transformers' dense SDPA expands KV by

    def projected(spans):
        module.tailor_spans = spans
        out, _ = sparse_attention_forward(module, q, k, v, mask, scaling=scale)
        return out.flatten(2) @ o_weight.T

    dense = projected(None)
    return torch.stack([torch.stack([
        (projected([p.to_json() if h == g else None for h in range(hkv)]) - dense).square().sum(-1)
        for p in patterns]) for g in range(hkv)])


@pytest.mark.parametrize("causal,masked", [(True, False), (True, True), (False, False)])
def test_block_by_block_equals_the_full_attention(causal, masked):
    torch.manual_seed(0)
    b, hq, hkv, t, d, hidden = 2, 6, 2, 40, 8, 12
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    o_weight = torch.randn(hidden, hq * d, dtype=torch.float64)
    patterns = [Pattern(2, 3, 0.0), Pattern(0, 1, 0.25), Pattern(4, 2, 0.125), Pattern(1, 30, 0.0)]
    # the model's own mask, as transformers passes it: causal, one sequence's first keys padded
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool)).repeat(b, 1, 1, 1) if masked else None
    if masked:
        mask[1, :, 5:, :2] = False
    blocks = [(0, 7), (13, 29), (29, 40)]  # rows 7..12 not sampled
    rows = [i for a, c in blocks for i in range(a, c)]
    want = _reference(q, k, v, patterns, causal, 0.4, o_weight, mask)[..., rows]
    got = pattern_errors(q, k, v, patterns, scaling=0.4, causal=causal, attention_mask=mask,
                         o_factor=output_factor(o_weight, hkv), blocks=blocks)
    assert got.dtype == torch.float32 and got.shape == (hkv, len(patterns), b, len(rows))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * float(want.max()))
    # in bfloat16 the proxy is still computed in float32, from the rounded inputs
    low = [x.to(torch.bfloat16) for x in (q, k, v, o_weight)]
    got = pattern_errors(*low[:3], patterns, scaling=0.4, causal=causal, attention_mask=mask,
                         o_factor=output_factor(low[3], hkv), blocks=blocks)
    want = _reference(*(x.double() for x in low[:3]), patterns, causal, 0.4, low[3].double(), mask)[..., rows]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6 * float(want.max()))


def test_monotone_map_is_monotone_and_fits_ordered_points():
    rng = np.random.default_rng(0)
    proxy = np.exp(rng.uniform(-12, 0, 40))
    loss = proxy ** 0.8 * np.exp(rng.normal(0, 0.5, 40))  # noisy: violators to pool
    mapped = monotone_map(proxy, loss)
    xs = np.sort(np.exp(rng.uniform(-14, 1, 500)))
    assert (np.diff(mapped(xs)) >= 0).all()
    assert mapped(np.array([1e-20]))[0] == mapped(np.array([proxy.min()]))[0]  # flat beyond the points
    ordered = np.sort(loss)
    np.testing.assert_allclose(monotone_map(np.sort(proxy), ordered)(np.sort(proxy)), ordered)


def test_profile_measures_few_and_maps_the_rest(llama):
    grid = default_grid(N)
    texts = {N // 2: ids_for(batch=2, seq=N // 2, seed=5), N: ids_for(batch=2, seq=N, seed=6)}
    kw = dict(retrieval_weight=0.0, progress=False)
    full = profile_attention(llama, texts, {}, grid, measured_per_length=None, **kw)
    few = profile_attention(llama, texts, {}, grid, measured_per_length=6, **kw)
    with pytest.raises(ValueError, match="at least 1"):
        profile_attention(llama, texts, {}, grid, measured_per_length=0, **kw)
    assert 0 < few.measured <= 12 < full.measured
    for n in texts:
        known, measured = few.was_measured[n], few.was_measured[n] & full.was_measured[n]
        assert 0 < known.sum() <= 6 and measured.any()
        np.testing.assert_array_equal(few.loss[n][measured], full.loss[n][measured])  # kept as measured
        np.testing.assert_array_equal(few.proxy[n], full.proxy[n])
        dense = [k for k, p in enumerate(grid) if p.is_dense_at(n)]
        assert (few.loss[n][:, :, dense] == 0).all() and (few.proxy[n][:, :, dense] == 0).all()
        # the rest: the map fitted on the measured cells, capped by what a pattern inside was
        # measured to cost; a measured (nearly) lossless pattern inside gives its loss
        mapped = monotone_map(few.proxy[n][known], few.loss[n][known])
        for cell in zip(*np.nonzero(~known & (few.proxy[n] > 0))):
            layer, head, k = (int(c) for c in cell)
            inner = [few.loss[n][layer, head, j] for j in range(len(grid))
                     if known[layer, head, j] and contains(grid[k], grid[j], n)]
            lossless = [v for v in inner if v <= LOSSLESS]
            want = min(lossless) if lossless else min([mapped(few.proxy[n][cell]), *inner])
            assert few.loss[n][cell] == pytest.approx(want, rel=1e-12, abs=0), (cell, inner)
        assert few.spearman[n] is None or -1 <= few.spearman[n] <= 1
        assert full.spearman[n] > 0.5  # the proxy ranks the tiny model's cells as their KL does


def test_profile_runs_in_bfloat16():
    model = build_model("llama").to(torch.bfloat16)
    backend = backend_for(capture(model))
    got = profile_attention(backend, {N: ids_for(batch=1, seq=N, seed=2)}, {}, default_grid(N)[:4],
                            retrieval_weight=0.0, progress=False, measured_per_length=3)
    assert 0 < got.measured <= 3
    assert np.isfinite(got.proxy[N]).all() and np.isfinite(got.loss[N]).all()
    assert got.proxy[N].dtype == np.float64 and (got.proxy[N] > 0).all()
