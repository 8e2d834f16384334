"""The greedy optimal-brain-surgeon ranking (tailor.passes.obs) against exhaustive refits."""
import itertools

import numpy as np

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
        imp = removal_importance(w, gram)
        errors = [_refit_error(w, xa, [c for c in range(8) if c != r]) for r in range(8)]
        assert int(np.argmin(imp)) == int(np.argmin(errors))


def test_duplicated_channel_goes_first():
    # channel 1 repeats channel 0 exactly: either can go at no cost, though both are large,
    # which a per-channel magnitude score (FLAP's fluctuation) cannot see
    w, _, xa = _data(7, n=6)
    xa = np.concatenate([xa[:, :1], xa[:, :1], xa[:, 2:]], 1)
    gram = xa.T @ xa / len(xa)
    w[:, :2] *= 10
    imp = removal_importance(w, gram, ridge=1e-6)
    assert int(np.argmin(imp)) in (0, 1)
    assert len(set(imp.tolist())) == len(imp)  # a full ranking


def test_groups_rank_close_to_exhaustive_choice():
    # keep 2 of 4 groups of 2 channels: the greedy choice is within 10% of the best pair
    for seed in range(4):
        w, gram, xa = _data(10 + seed)
        imp = removal_importance(w, gram, group=2)
        greedy = sorted(np.argsort(-imp, kind="stable")[:2].tolist())
        cols = lambda groups: [c for g in groups for c in (2 * g, 2 * g + 1)]  # noqa: E731
        errors = {pair: _refit_error(w, xa, cols(pair)) for pair in itertools.combinations(range(4), 2)}
        assert errors[tuple(greedy)] <= 1.1 * min(errors.values())
