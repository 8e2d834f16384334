"""The greedy optimal-brain-surgeon ranking (tailor.passes.obs) against exhaustive refits."""
import itertools

import numpy as np
import pytest
import torch

from tailor.passes.obs import removal_importance


def _data(seed: int, n: int = 8, out: int = 5, tokens: int = 400):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n, n)) * rng.uniform(0.2, 2.0, size=n)  # correlated channels
    x = rng.normal(size=(tokens, n)) @ mix + rng.normal(size=n)
    xa = np.concatenate([x, np.ones((tokens, 1))], 1)
    return rng.normal(size=(out, n)), xa.T @ xa / tokens, xa


def _refit_error(w, xa, kept) -> float:
    """What remains of the projection's output after refitting the kept channels and the bias
    by plain least squares."""
    full = xa[:, :-1] @ w.T
    basis = xa[:, kept + [xa.shape[1] - 1]]
    sol = np.linalg.lstsq(basis, full, rcond=None)[0]
    return float(((basis @ sol - full) ** 2).sum())


def test_first_removal_is_the_cheapest_single_removal():
    # without a ridge the OBS cost of one removal is exactly the refit error it leaves
    for seed in range(4):
        w, gram, xa = _data(seed)
        imp = removal_importance(w, gram)[0]
        errors = [_refit_error(w, xa, [c for c in range(8) if c != r]) for r in range(8)]
        assert int(np.argmin(imp)) == int(np.argmin(errors))


def test_duplicated_channel_goes_first():
    # channel 1 repeats channel 0 exactly: either can go at no cost, though both are large,
    # which a per-channel magnitude score (FLAP's fluctuation) cannot see
    w, _, xa = _data(7, n=6)
    xa = np.concatenate([xa[:, :1], xa[:, :1], xa[:, 2:]], 1)
    gram = xa.T @ xa / len(xa)
    w[:, :2] *= 10
    imp = removal_importance(w, gram, ridge=1e-6)[0]
    assert int(np.argmin(imp)) in (0, 1)
    assert len(set(imp.tolist())) == len(imp)  # a full ranking


def test_groups_rank_close_to_exhaustive_choice():
    # keep 2 of 4 groups of 2 channels: the greedy choice is within 10% of the best pair
    for seed in range(4):
        w, gram, xa = _data(10 + seed)
        imp = removal_importance(w, gram, group=2)[0]
        greedy = sorted(np.argsort(-imp, kind="stable")[:2].tolist())
        cols = lambda groups: [c for g in groups for c in (2 * g, 2 * g + 1)]  # noqa: E731
        errors = {pair: _refit_error(w, xa, cols(pair)) for pair in itertools.combinations(range(4), 2)}
        assert errors[tuple(greedy)] <= 1.1 * min(errors.values())


def _numpy_removal_importance(weight, gram, group=1, ridge=0.0):
    """The numpy implementation removal_importance replaced (tailor 2026-11), as the reference
    the torch one must rank like."""
    from tailor.passes.obs import STEPS

    w = np.array(weight, dtype=np.float64)
    n = w.shape[1]
    g = np.array(gram, dtype=np.float64)
    g[np.arange(n), np.arange(n)] += ridge * g.diagonal()[:n].mean()
    h = np.linalg.pinv(g, hermitian=True)
    groups = n // group
    alive = np.ones(groups, dtype=bool)
    importance = np.zeros(groups)
    per_step = max(1, groups // STEPS)
    step = 0
    while alive.sum() > 1:
        cost = np.full(groups, np.inf)
        live = np.flatnonzero(alive)
        cols = live[:, None] * group + np.arange(group)
        wq = np.moveaxis(w[:, cols], 1, 0)
        inv = np.linalg.pinv(h[cols[:, :, None], cols[:, None, :]], hermitian=True)
        cost[live] = np.einsum("log,lgk,lok->l", wq, inv, wq)
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


def test_the_ranking_is_the_numpy_reference_s_on_the_cases_above():
    cases = [(w, gram, 1, 0.0) for w, gram, _ in map(_data, range(4))]
    w, _, xa = _data(7, n=6)
    xa = np.concatenate([xa[:, :1], xa[:, :1], xa[:, 2:]], 1)
    w[:, :2] *= 10
    cases.append((w, xa.T @ xa / len(xa), 1, 1e-6))
    cases += [(w, gram, 2, 0.0) for w, gram, _ in (_data(10 + s) for s in range(4))]
    for w, gram, group, ridge in cases:
        np.testing.assert_array_equal(removal_importance(w, gram, group, ridge)[0],
                                      _numpy_removal_importance(w, gram, group, ridge))


@pytest.mark.parametrize("n, group", [(256, 1), (512, 2), (96, 8)])
@pytest.mark.parametrize("ridge", [0.1, 0.0])
def test_the_ranking_is_the_numpy_reference_s_on_wide_random_layers(n, group, ridge):
    """Several groups per step where there are more than STEPS, one at a time below; from numpy
    and from float32 torch tensors (as a model and the stored profile give them)."""
    rng = np.random.default_rng(n + group)
    tokens = 3 * n
    x = rng.normal(size=(tokens, n)) @ (rng.normal(size=(n, n)) * rng.uniform(0.1, 2.0, size=n) / np.sqrt(n))
    xa = np.concatenate([x + rng.normal(size=n), np.ones((tokens, 1))], 1).astype(np.float32)
    gram = xa.T.astype(np.float64) @ xa / tokens
    w = rng.normal(size=(48, n)).astype(np.float32)
    np.testing.assert_array_equal(removal_importance(w, gram, group, ridge)[0],
                                  _numpy_removal_importance(w, gram, group, ridge))
    np.testing.assert_array_equal(
        removal_importance(torch.from_numpy(w), torch.from_numpy(gram).float(), group, ridge)[0],
        _numpy_removal_importance(w, gram.astype(np.float32), group, ridge))


def test_a_singular_gram_without_ridge_still_gives_a_full_ranking():
    # a copied channel and no ridge: Cholesky cannot invert G, the pseudo-inverse does (the order
    # among such channels rests on rounding, in the numpy reference as here)
    w, _, xa = _data(5, n=10)
    xa = np.concatenate([xa[:, :1], xa[:, :1], xa[:, 2:]], 1)
    imp = removal_importance(w, xa.T @ xa / len(xa))[0]
    assert sorted(imp.tolist()) == list(range(10))
