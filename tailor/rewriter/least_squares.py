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
"""
from __future__ import annotations

import numpy as np

COMPENSATION_RIDGE = 0.1
REFIT_RIDGE = 1.0


def ridge_fit(gram: np.ndarray, cross: np.ndarray, w0: np.ndarray, b0: np.ndarray | None,
              ridge: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The estimator above: gram [(n + 1), (n + 1)], cross [out, n + 1], w0 [out, n]. A projection
    without a bias (`b0` None) stays without one: W' alone is fitted."""
    n = w0.shape[1]
    size = n + 1 if b0 is not None else n
    gram, cross = gram[:size, :size], cross[:, :size]
    reg = np.zeros(size)
    reg[:n] = ridge * gram.diagonal()[:n].mean()
    w_aug = np.concatenate([w0, b0[:, None]], 1) if b0 is not None else w0
    # lstsq, not solve: a channel that never varies on the calibration data leaves G singular
    sol = np.linalg.lstsq(gram + np.diag(reg), (cross + w_aug * reg).T, rcond=None)[0].T
    return sol[:, :n], (sol[:, n] if b0 is not None else None)


def compensate(w: np.ndarray, b: np.ndarray | None, gram: np.ndarray, kept,
               ridge: float = COMPENSATION_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Drop input channels of a projection W [out, in] (bias b) and refit the rest: the kept
    weights W_K' and a bias b' that best reproduce the full output W x + b, from G = E[x̃x̃ᵀ] of
    the full input. Over K̃ = K ∪ {bias}: C = [W | b] G[:, K̃] (FLAP's bias compensation, the
    removed channels' mean contribution, is the special case of uncorrelated channels). Always
    returns a bias."""
    w = np.asarray(w, dtype=np.float64)
    n_in = w.shape[1]
    b = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
    kept = np.asarray(kept, dtype=np.int64)
    idx = np.append(kept, n_in)
    gram = np.asarray(gram, dtype=np.float64)
    cross = np.concatenate([w, b[:, None]], 1) @ gram[:, idx]
    w_kept, bias = ridge_fit(gram[np.ix_(idx, idx)], cross, w[:, kept], b, ridge)
    return w_kept, bias
