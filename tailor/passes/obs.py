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
The ΔE summed along the way is what removing a prefix of that order costs: relative to the
projection's output energy tr(W G Wᵀ), a proxy for the options that prune that prefix.
"""
from __future__ import annotations

import numpy as np
import torch

from tailor.rewriter.least_squares import compute_device, float64, inverse_psd, pinv_hermitian

# groups removed per step: width / STEPS (one at a time below that many groups)
STEPS = 128


def removal_importance(weight, gram, group: int = 1, ridge: float = 0.0,
                       device=None) -> tuple[np.ndarray, np.ndarray]:
    """weight [out, n] (the projection, out_in layout), gram [(n + 1), (n + 1)] with the bias
    input last, numpy or torch. Returns, per group of `group` consecutive input channels, its
    importance (higher means removed later; the order is what matters) and the error of removing
    it with every group removed before it, compensated, relative to the output energy. Computed in
    float64 on `device` (default: the first tensor's, else the CPU), so that a model on a GPU is
    ranked there: the work grows as n³ (n = 14336 for an 8B model's FFN)."""
    device = compute_device(weight, gram, device=device)
    # W transposed, [n, out], and H symmetric: every gather below takes whole rows, contiguous,
    # where taking columns cost ~100× more on the CPU
    wt = float64(weight, device).T.clone(memory_format=torch.contiguous_format)
    n, out = wt.shape
    if n % group:
        raise ValueError(f"{n} input channels do not split into groups of {group}")
    g = float64(gram, device, copy=True)
    energy = float((wt * (g[:n, :n] @ wt)).sum()) or 1.0  # tr(W G Wᵀ), before the ridge
    g.diagonal()[:n] += ridge * g.diagonal()[:n].mean()
    h = inverse_psd(g)
    del g  # (n + 1)² float64 each: 1.6 GB at n = 14336
    groups = n // group
    alive = torch.ones(groups, dtype=torch.bool, device=device)
    importance = torch.zeros(groups, dtype=torch.float64, device=device)
    error = torch.zeros(groups, dtype=torch.float64, device=device)
    removed = 0.0
    per_step = max(1, groups // STEPS)
    offsets = torch.arange(group, device=device)
    step, left = 0, groups
    while left > 1:
        live = alive.nonzero().squeeze(1)
        cost = _removal_costs(wt.view(groups, group, out).index_select(0, live), h,
                              live[:, None] * group + offsets)
        cheapest = torch.argsort(cost, stable=True)[:min(per_step, left - 1)]
        take = live[cheapest]
        importance[take] = step
        removed += float(cost[cheapest].clamp_min(0).sum())  # the step's groups priced apart: a bound
        error[take] = removed
        cols = (take[:, None] * group + offsets).flatten()
        rows = h.index_select(0, cols)                                  # H_Q,: = H_:,Qᵀ [k, n + 1]
        block = pinv_hermitian(rows.index_select(1, cols))              # (H_QQ)⁻¹
        # W ← W − W_Q (H_QQ)⁻¹ H_Q,:  and  H ← H − H_:,Q (H_QQ)⁻¹ H_Q,: , in place (no second
        # (n + 1)² matrix)
        wt.addmm_(rows[:, :n].T, block @ wt.index_select(0, cols), alpha=-1)
        h.addmm_(rows.T, block @ rows, alpha=-1)
        alive[take] = False
        left -= len(take)
        step += 1
    importance[alive] = step
    error[alive] = removed + float(cost.clamp_min(0).max()) if groups > 1 else energy
    return importance.cpu().numpy(), (error / energy).cpu().numpy()


def _removal_costs(wq: torch.Tensor, h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """ΔE = tr(W_Q (H_QQ)⁻¹ W_Qᵀ) of each live group: wq [live, group, out] its weights
    (transposed), cols [live, group] its channels."""
    inv = pinv_hermitian(h[cols[:, :, None], cols[:, None, :]])         # [live, group, group]
    return (inv * (wq @ wq.transpose(1, 2))).sum((1, 2))
