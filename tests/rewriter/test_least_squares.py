"""The one least-squares estimator behind compensation (pruning passes) and the sequential refit."""
from __future__ import annotations

import numpy as np

from tailor.rewriter.least_squares import COMPENSATION_RIDGE, REFIT_RIDGE, compensate, ridge_fit


def _stats(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xa = np.concatenate([x, np.ones((len(x), 1))], 1)
    return xa.T @ xa / len(x), t.T @ xa / len(x)


def test_ridge_fit_recovers_a_linear_map_and_keeps_a_missing_bias_missing():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 6))
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    gram, cross = _stats(x, x @ w.T + b)
    w2, b2 = ridge_fit(gram, cross, np.zeros_like(w), np.zeros(3), ridge=0.0)
    np.testing.assert_allclose(w2, w, atol=1e-8)
    np.testing.assert_allclose(b2, b, atol=1e-8)
    w3, b3 = ridge_fit(gram, cross, np.zeros_like(w), None, ridge=0.0)
    assert b3 is None and w3.shape == w.shape


def test_compensation_is_the_refit_of_the_full_output():
    """compensate() is ridge_fit on the kept channels with the full output as target: the same
    estimator the sequential refit runs, only its statistics and strength differ."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 8)) @ rng.normal(size=(8, 8)) + 0.5
    w, b = rng.normal(size=(4, 8)), rng.normal(size=4)
    kept = np.array([0, 2, 3, 6])
    gram, _ = _stats(x, x)
    w_c, b_c = compensate(w, b, gram, kept, ridge=0.3)
    _, cross = _stats(x[:, kept], x @ w.T + b)
    gram_k, _ = _stats(x[:, kept], x[:, kept])
    w_r, b_r = ridge_fit(gram_k, cross, w[:, kept], b, ridge=0.3)
    np.testing.assert_allclose(w_c, w_r, atol=1e-9)
    np.testing.assert_allclose(b_c, b_r, atol=1e-9)


def test_compensation_reproduces_a_redundant_channel_and_the_mean_of_a_constant_one():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4000, 5))
    x[:, 3] = 2.0 * x[:, 1]            # a copy: dropping it loses nothing once channel 1 takes it up
    x[:, 4] = 0.7                      # a constant: its contribution becomes bias
    w = rng.normal(size=(3, 5))
    gram, _ = _stats(x, x)
    w_k, b_k = compensate(w, None, gram, [0, 1, 2], ridge=0.0)
    np.testing.assert_allclose(x[:, :3] @ w_k.T + b_k, x @ w.T, atol=1e-6)


def test_the_compensation_pull_is_weaker_than_the_refit_pull():
    """Why the two strengths differ (not a bug): compensation starts from the plainly sliced
    weights, wrong by design where channels went, so a strong pull toward them keeps the error;
    the refit starts from compensated weights, where the same pull costs almost nothing."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(4000, 4))
    x = np.concatenate([base, base[:, :2] + 0.3 * rng.normal(size=(4000, 2))], 1)  # 4, 5 ≈ 0, 1
    w = rng.normal(size=(3, 6))
    gram, _ = _stats(x, x)
    kept, target = [0, 1, 2, 3], x @ w.T

    def err(wk, bk):
        return float(np.mean((x[:, kept] @ wk.T + bk - target) ** 2))

    weak, strong = (err(*compensate(w, None, gram, kept, ridge=r)) for r in (COMPENSATION_RIDGE, REFIT_RIDGE))
    assert weak < 0.7 * strong
    start = compensate(w, None, gram, kept, ridge=0.0)
    gram_k, cross = _stats(x[:, kept], target)
    refit = ridge_fit(gram_k, cross, start[0], start[1], ridge=REFIT_RIDGE)
    assert err(*refit) <= err(*start) * 1.01 + 1e-12
