"""One least-squares estimator for every refit of a projection's weights:

    argmin over [W' | b'] of E||t − W'x − b'||² + λ||W' − W0||²,   λ = ridge · mean diag E[xxᵀ]

with the statistics G = E[x̃x̃ᵀ] and C = E[t x̃ᵀ] (x̃ = [x; 1]); the bias goes unregularised.
Two callers, one form, two strengths:
- compensation (`compensate`: head_prune, ffn_prune): the kept input channels and a bias refitted
  to reproduce the projection's full output from the dense model's statistics, pulled toward
  the plainly sliced weights W0 (wrong by design where channels went: a strong pull keeps the
  error). COMPENSATION_RIDGE = 0.1: on refllama-16m it generalised slightly better from
  code-calib to code-eval than 0 or 1.
- the sequential refit (tailor.passes.refit): the projection fitted on the rewritten model's own
  inputs toward the dense residual stream, pulled toward the compensated weights (a good prior:
  the pull only stops it chasing calibration noise). REFIT_RIDGE = 1.0; on MiniLM at 0.75 a
  ridge of 0.1 there did worse than none (tailor/passes/refit.py).

Everything here runs in torch, in float64, on the device of the tensors given (a model on CUDA
is solved on CUDA: an 8B model's FFN gram is 14337² values); numpy inputs are solved on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch

COMPENSATION_RIDGE = 0.1
REFIT_RIDGE = 1.0

# numpy.linalg.pinv's default cutoff, relative to the largest eigenvalue: where a pseudo-inverse
# is needed, it is numpy's (tests/passes/test_obs.py ranks against a numpy reference)
PINV_RTOL = 1e-15
# Cholesky also succeeds on some matrices that are singular but for rounding, and then inverts
# noise: each pivot² is the part of its channel's variance (diagonal entry) the channels before
# it leave unexplained, and below this fraction the matrix is taken as singular (the inverse
# would keep fewer than about six significant digits)
SINGULAR_PIVOT = 1e-10


def compute_device(*arrays, device=None) -> torch.device:
    """Where to compute: `device` if given, else the device of the first torch tensor among
    `arrays`, else the CPU."""
    if device is not None:
        return torch.device(device)
    return next((a.device for a in arrays if isinstance(a, torch.Tensor)), torch.device("cpu"))


def float64(x, device, *, copy: bool = False) -> torch.Tensor:
    """x (numpy, torch or a list) as a float64 tensor on `device`; with `copy`, never memory the
    caller holds. Moved in its own dtype first: a float32 gram crosses to the GPU at half the
    bytes."""
    # torch takes numpy's memory only where it is contiguous and writable (onnxruntime's and
    # onnx_ir's arrays may be read-only): else a copy
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.require(x, requirements=["C", "W"]))
    moved = t.to(device)
    # a move to another device made a new tensor already
    return moved.to(torch.float64, copy=copy and moved is t)


def _like(reference, x: torch.Tensor):
    """x as the kind of array `reference` is: a tensor where it is one, else numpy."""
    return x if isinstance(reference, torch.Tensor) else x.cpu().numpy()


def _cholesky(a: torch.Tensor) -> torch.Tensor | None:
    """The Cholesky factor of a symmetric a, or None where a is not safely positive definite."""
    chol, info = torch.linalg.cholesky_ex(a)
    if info.item() != 0 or bool((chol.diagonal() ** 2 < SINGULAR_PIVOT * a.diagonal()).any()):
        return None
    return chol


def pinv_hermitian(a: torch.Tensor, rtol: float = PINV_RTOL) -> torch.Tensor:
    """numpy.linalg.pinv(a, hermitian=True), batched over leading dimensions."""
    if a.shape[-1] == 1:  # ungrouped channels' 1×1 blocks: skip one eigendecomposition each
        return torch.where(a != 0, 1 / a, 0)
    return torch.linalg.pinv(a, rtol=rtol, hermitian=True)


def inverse_psd(a: torch.Tensor, rtol: float = PINV_RTOL) -> torch.Tensor:
    """a⁻¹ of a symmetric positive semi-definite a: by Cholesky (a third of the work of an
    eigendecomposition) where a is safely definite, else its pseudo-inverse."""
    chol = _cholesky(a)
    return torch.cholesky_inverse(chol) if chol is not None else pinv_hermitian(a, rtol)


def solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹ b for a symmetric positive semi-definite a; where a is singular (without a ridge, a
    channel that never varies on the calibration data), the minimum-norm least-squares solution
    numpy's lstsq gave."""
    chol = _cholesky(a)
    if chol is not None:
        return torch.cholesky_solve(b, chol)
    return pinv_hermitian(a, torch.finfo(torch.float64).eps * len(a)) @ b


def add_gram(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """acc + Σ x̃x̃ᵀ over the rows of x [tokens, n] (x̃ = [x; 1]), summed into acc in place (a new
    float64 accumulator on x's device where acc is None). By blocks, so that no [x | 1] copy of a
    large x is made."""
    x = x.to(torch.float64)
    n = x.shape[1]
    if acc is None:
        acc = x.new_zeros(n + 1, n + 1)
    acc[:n, :n].addmm_(x.T, x)
    s = x.sum(0)
    acc[:n, n] += s
    acc[n, :n] += s
    acc[n, n] += len(x)
    return acc


def add_cross(acc: torch.Tensor | None, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """acc + Σ t x̃ᵀ over the rows of t [tokens, out] and x [tokens, n], as add_gram."""
    t, x = t.to(torch.float64), x.to(torch.float64)
    n = x.shape[1]
    if acc is None:
        acc = x.new_zeros(t.shape[1], n + 1)
    acc[:, :n].addmm_(t.T, x)
    acc[:, n] += t.sum(0)
    return acc


def ridge_fit(gram, cross, w0, b0, ridge: float):
    """The estimator above: gram [(n + 1), (n + 1)], cross [out, n + 1], w0 [out, n] (numpy or
    torch, any float dtype). A projection without a bias (`b0` None) stays without one: W' alone
    is fitted. Solved in float64 on the first tensor's device; returns tensors there where w0 is a
    tensor, numpy arrays where it is one."""
    device = compute_device(gram, cross, w0, b0)
    n = w0.shape[1]
    size = n + 1 if b0 is not None else n
    gram, cross = float64(gram, device)[:size, :size], float64(cross, device)[:, :size]
    reg = torch.zeros(size, dtype=torch.float64, device=device)
    reg[:n] = ridge * gram.diagonal()[:n].mean()
    w = float64(w0, device)
    w_aug = torch.cat([w, float64(b0, device)[:, None]], 1) if b0 is not None else w
    regularised = gram.clone()  # one more (n + 1)² matrix, not two as gram + diag(reg)
    regularised.diagonal().add_(reg)
    sol = solve_psd(regularised, (cross + w_aug * reg).T).T
    return _like(w0, sol[:, :n]), (_like(w0, sol[:, n]) if b0 is not None else None)


def compensate(w, b, gram, kept, ridge: float = COMPENSATION_RIDGE):
    """Drop input channels of a projection W [out, in] (bias b) and refit the rest: the kept
    weights W_K' and a bias b' that best reproduce the full output W x + b, from G = E[x̃x̃ᵀ] of
    the full input. Over K̃ = K ∪ {bias}: C = [W | b] G[:, K̃] (FLAP's bias compensation, the
    removed channels' mean contribution, is the special case of uncorrelated channels). Always
    returns a bias; solved as ridge_fit, returned as the kind of array `w` is."""
    device = compute_device(w, b, gram)
    w64 = float64(w, device)
    n_in = w64.shape[1]
    b64 = torch.zeros(w64.shape[0], dtype=torch.float64, device=device) if b is None else float64(b, device)
    kept = torch.as_tensor(kept, dtype=torch.long, device=device)
    idx = torch.cat([kept, kept.new_tensor([n_in])])
    gram = float64(gram, device)
    cross = torch.cat([w64, b64[:, None]], 1) @ gram.index_select(1, idx)
    w_kept, bias = ridge_fit(gram.index_select(0, idx).index_select(1, idx), cross,
                             w64.index_select(1, kept), b64, ridge)
    return _like(w, w_kept), _like(w, bias)
