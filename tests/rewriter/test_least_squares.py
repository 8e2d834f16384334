"""The one least-squares estimator behind compensation (pruning passes) and the sequential refit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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


def _numpy_ridge_fit(gram, cross, w0, b0, ridge):
    """The numpy implementation ridge_fit replaced (tailor 2026-11): the reference."""
    n = w0.shape[1]
    size = n + 1 if b0 is not None else n
    gram, cross = gram[:size, :size], cross[:, :size]
    reg = np.zeros(size)
    reg[:n] = ridge * gram.diagonal()[:n].mean()
    w_aug = np.concatenate([w0, b0[:, None]], 1) if b0 is not None else w0
    sol = np.linalg.lstsq(gram + np.diag(reg), (cross + w_aug * reg).T, rcond=None)[0].T
    return sol[:, :n], (sol[:, n] if b0 is not None else None)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("singular", [False, True])
def test_ridge_fit_and_compensate_give_the_numpy_reference_s_numbers_on_any_device_and_dtype(
        device, dtype, singular):
    """Tensors in (any float dtype, on their device): tensors out, there, in float64, equal within
    1e-9 to the numpy reference's on the values the tensors hold. Singular: a channel copied and
    no ridge, where the solve falls back to the minimum-norm solution lstsq gave."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 7)) @ rng.normal(size=(7, 7)) + 0.3
    if singular:
        x[:, 5] = x[:, 2]
    gram, w, b = (torch.as_tensor(a).to(dtype) for a in (_stats(x, x)[0], rng.normal(size=(4, 7)),
                                                         rng.normal(size=4)))
    g64, w64, b64 = (t.double().numpy() for t in (gram, w, b))
    kept = [0, 2, 3, 5, 6]
    idx = kept + [7]
    cross = np.concatenate([w64, b64[:, None]], 1) @ g64[:, idx]
    for ridge in (0.0,) if singular else (0.0, 0.3):
        expected = _numpy_ridge_fit(g64[np.ix_(idx, idx)], cross, w64[:, kept], b64, ridge)
        fitted = ridge_fit(gram.to(device)[idx][:, idx], torch.from_numpy(cross).to(device),
                           w[:, kept].to(device), b.to(device), ridge)
        compensated = compensate(w.to(device), b.to(device), gram.to(device), torch.tensor(kept), ridge)
        for result in (fitted, compensated):
            for got, want in zip(result, expected):
                assert got.device.type == device and got.dtype == torch.float64
                np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
