"""Which input channels of a projection matter once the others are refitted: a greedy, structured
optimal brain surgeon (OBS; ZipLM's structured form) over groups of input columns.

Pruning refits the kept channels by least squares (rewriter.least_squares.compensate), so a
channel the others can reproduce costs little to drop however large it is, and two channels
that carry the same signal are not both needed. FLAP's fluctuation metric, Var(x_c)·||W[:, c]||²,
scores each channel alone and sees neither; OBS prices every removal with the compensation done.

With G = E[x̃x̃ᵀ] (x̃ = [x; 1]) regularised like the refit (ridge λ on the channels), H = G⁻¹ and
the current, already compensated weights W, removing group Q costs
    ΔE_Q = tr(W_Q (H_QQ)⁻¹ W_Qᵀ)
and compensating for it is W ← W − W_Q (H_QQ)⁻¹ H_Q,: ; H ← H − H_:,Q (H_QQ)⁻¹ H_Q,: .
Groups are removed cheapest first, a few at a time on wide layers (a rank-k update per step);
a group's importance is the step that removed it (the last survivors ranked by their final ΔE).
"""
from __future__ import annotations

import numpy as np

# groups removed per step: width / STEPS (one at a time below that many groups)
STEPS = 128


def removal_importance(weight: np.ndarray, gram: np.ndarray, group: int = 1,
                       ridge: float = 0.0) -> np.ndarray:
    """weight [out, n] (the projection, out_in layout), gram [(n + 1), (n + 1)] with the bias
    input last. Returns one float per group of `group` consecutive input channels: higher means
    removed later, i.e. more important; the order is what matters."""
    w = np.array(weight, dtype=np.float64)
    n = w.shape[1]
    if n % group:
        raise ValueError(f"{n} input channels do not split into groups of {group}")
    g = np.array(gram, dtype=np.float64)
    g[np.arange(n), np.arange(n)] += ridge * g.diagonal()[:n].mean()
    h = np.linalg.pinv(g, hermitian=True)
    groups = n // group
    alive = np.ones(groups, dtype=bool)
    importance = np.zeros(groups)
    per_step = max(1, groups // STEPS)
    step = 0
    while alive.sum() > 1:
        cost = _removal_costs(w, h, group, alive)
        live = np.flatnonzero(alive)
        take = live[np.argsort(cost[live], kind="stable")[:min(per_step, len(live) - 1)]]
        importance[take] = step
        cols = (take[:, None] * group + np.arange(group)).ravel()
        block = np.linalg.pinv(h[np.ix_(cols, cols)], hermitian=True)
        w -= (w[:, cols] @ block) @ h[cols, :n]
        h -= h[:, cols] @ block @ h[cols, :]
        alive[take] = False
        step += 1
    importance[alive] = step
    return importance


def _removal_costs(w: np.ndarray, h: np.ndarray, group: int, alive: np.ndarray) -> np.ndarray:
    """ΔE per group (inf where removed already)."""
    cost = np.full(len(alive), np.inf)
    live = np.flatnonzero(alive)
    cols = live[:, None] * group + np.arange(group)                    # [live, group]
    blocks = h[cols[:, :, None], cols[:, None, :]]                      # [live, group, group]
    wq = np.moveaxis(w[:, cols], 1, 0)                                  # [live, out, group]
    inv = np.linalg.pinv(blocks, hermitian=True)
    cost[live] = np.einsum("log,lgk,lok->l", wq, inv, wq)
    return cost
