"""One budgeted search over every pass's options.

A multiple-choice knapsack solved exactly with scipy's HiGHS MILP:
    minimise   Σ loss_o · x_o
    subject to Σ cost_o · x_o ≤ (B - 1) · cost(dense)      (cost_o < 0: what option o saves)
               Σ_{o claims r} x_o ≤ 1   for every resource r (a layer's attention, its FFN, ...)
               x_o ∈ {0, 1}
Losses start as each option's KL measured alone. Options interact, so a refine loop applies the
plan, measures its real KL on held-out calibration windows, shares the loss the estimates missed
out over the chosen options (half by estimate, half equally, so that an option estimated free can
be found out too) and solves again; the plan each pass reaches alone is measured as well, and
the best measured plan wins. Deterministic: HiGHS on the
same inputs returns the same solution and ties break on option order.

An option of a pass that composes (INT8: it changes how a part runs, not its shape) combines with
other options of its layer, and a pair's joint cost is not the sum of the two (INT8 on an FFN
pruned to half saves half what INT8 on the whole FFN saves). Each such pair i, j whose joint
cost differs by c_ij gets a variable y_ij = x_i · x_j, exactly linearised:
               y_ij ≤ x_i,  y_ij ≤ x_j,  y_ij ≥ x_i + x_j - 1,  y_ij ∈ [0, 1]
and c_ij · y_ij joins the budget's row (pair_costs; the cost model prices the joint structure).

Some plans must also keep a value the same on every layer (a standard transformers config says
one FFN width: tailor.passes.standard). Such a `Uniform` is a joint constraint, added to the
same MILP with one binary z_v per value v the options can give (none chosen: every layer keeps
its own, dense, value):
               Σ_v z_v ≤ 1
               Σ_{o on layer i giving v} x_o ≤ z_v                      for every layer i, value v
               Σ_{o on layer i giving v or removing i} x_o ≥ z_v        for every layer i, value v
A Uniform that is not `every_layer` (one sliding window, which any layer may leave full) drops
the last row: the layers that take a value share it, the others keep their own.
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from tailor.core.errors import TailorError
from tailor.passes.base import Option
from tailor.passes.cost import OBJECTIVES, CostModel, Structure
from tailor.passes.registry import PASSES

# what a Uniform's value function returns for an option that removes its layer (exempt from it)
REMOVED = "removed"


@dataclass(frozen=True)
class Uniform:
    """A per-layer value that every layer not removed must share: `value(option)` is the value the
    option gives its layer, REMOVED, or None where the option leaves the value alone. Not
    `every_layer`: the layers given a value share it, and the others may keep their own."""
    name: str
    value: Callable[[Option], Hashable | None]
    layers: int
    every_layer: bool = True


def keeps_uniform(chosen: list[Option], uniform: tuple[Uniform, ...]) -> bool:
    """Whether a whole plan keeps each Uniform value the same on every layer it does not remove
    (what the solver's rows enforce; a plan built outside the solver is checked with this)."""
    for u in uniform:
        given: dict[int, set] = {}
        for o in chosen:
            v = u.value(o)
            if v is not None:
                given.setdefault(o.layer, set()).add(v)
        values = {v for vs in given.values() for v in vs} - {REMOVED}
        if len(values) > 1:
            return False
        if u.every_layer and values and any(not given.get(layer, set()) & (values | {REMOVED})
                                            for layer in range(u.layers)):
            return False
    return True


def structure_of(graph, options: list[Option]) -> Structure:
    s = Structure.dense(graph)
    for o in options:
        PASSES[o.pass_name].reshape(o, s.part(o.layer))
    return s


def price(options: list[Option], cost_model: CostModel) -> None:
    """Fill each option's cost change per objective, exactly under the cost model (the cost is a
    sum over layers and the head, so only the option's own part changes)."""
    dense = Structure.dense(cost_model.graph)
    base = [cost_model.part(i, dense.part(i)) for i in range(len(dense.layers) + 1)]
    for o in options:
        shape = dense.copy().part(o.layer)
        PASSES[o.pass_name].reshape(o, shape)
        delta = cost_model.part(o.layer, shape) - base[o.layer]
        o.cost = {k: delta.get(k) for k in OBJECTIVES}


Pairs = dict[tuple[str, str], dict[str, float]]  # (option key, option key) → joint correction per objective


def pair_costs(options: list[Option], cost_model: CostModel) -> Pairs:
    """Per pair of an option of a composing pass and another option of its layer that claims
    nothing in common: the pair's joint cost change minus the sum of the two options' changes,
    per objective, exactly under the cost model; pairs whose costs do add up are left out.
    (Costs must be filled in: `price`.)"""
    dense = Structure.dense(cost_model.graph)
    scale = {k: abs(cost_model.total(dense).get(k)) or 1.0 for k in OBJECTIVES}
    by_layer: dict[int, list[Option]] = {}
    for o in options:
        by_layer.setdefault(o.layer, []).append(o)
    out: Pairs = {}
    for layer, here in by_layer.items():
        base = cost_model.part(layer, dense.part(layer))
        for q in (o for o in here if PASSES[o.pass_name].composes):
            for o in here:
                both_compose = PASSES[o.pass_name].composes
                if o is q or set(o.claims) & set(q.claims) or (both_compose and o.key < q.key):
                    continue  # the same part, or a pair of composing options already seen
                shape = dense.copy().part(layer)
                PASSES[q.pass_name].reshape(q, shape)
                PASSES[o.pass_name].reshape(o, shape)
                joint = cost_model.part(layer, shape) - base
                correction = {k: joint.get(k) - q.cost[k] - o.cost[k] for k in OBJECTIVES}
                if any(abs(v) > 1e-9 * scale[k] for k, v in correction.items()):
                    out[(q.key, o.key)] = correction
    return out


def _pair_rows(options: list[Option], pairs: Pairs | None, objective: str, dense_cost: float
               ) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The pairs among `options` with a joint correction, as option indices, and each one's
    correction as a fraction of the dense cost."""
    index = {o.key: j for j, o in enumerate(options)}
    found = [((index[a], index[b]), c[objective]) for (a, b), c in (pairs or {}).items()
             if a in index and b in index and c[objective] != 0]
    return [ij for ij, _ in found], np.array([c for _, c in found]) / dense_cost


def _linearised(n: int, extra: int, pairs: list[tuple[int, int]]) -> list[LinearConstraint]:
    """y_k = x_i · x_j for pair k = (i, j), the y after the options' x and `extra` other columns."""
    if not pairs:
        return []
    rows = np.zeros((3 * len(pairs), n + extra + len(pairs)))
    for k, (i, j) in enumerate(pairs):
        y = n + extra + k
        rows[3 * k, [y, i]] = 1.0, -1.0           # y ≤ x_i
        rows[3 * k + 1, [y, j]] = 1.0, -1.0       # y ≤ x_j
        rows[3 * k + 2, [i, j, y]] = 1.0, 1.0, -1.0  # x_i + x_j - y ≤ 1
    return [LinearConstraint(rows, -np.inf, np.tile([0.0, 0.0, 1.0], len(pairs)))]


def _claims_matrix(options: list[Option]):
    row = {c: i for i, c in enumerate(sorted({c for o in options for c in o.claims}))}
    rows = np.zeros((len(row), len(options)))
    for j, o in enumerate(options):
        for c in o.claims:
            rows[row[c], j] = 1.0
    return rows


def _uniform_rows(options: list[Option], uniform: tuple[Uniform, ...]) -> tuple[int, list[LinearConstraint]]:
    """The z variables (after the options' x) and the rows that make each Uniform hold (the
    module's docstring); every row spans x and z."""
    n, blocks = len(options), []
    for u in uniform:
        given = [u.value(o) for o in options]
        values = sorted({v for v in given if v is not None and v != REMOVED}, key=repr)
        blocks.append((given, values))
    z = sum(len(values) for _, values in blocks)
    rows, lower, upper = [], [], []
    offset = n
    for (given, values), u in zip(blocks, uniform):
        one = np.zeros(n + z)
        one[offset:offset + len(values)] = 1.0
        rows.append(one), lower.append(-np.inf), upper.append(1.0)
        for k, v in enumerate(values):
            for layer in range(u.layers):
                at = [j for j, o in enumerate(options) if o.layer == layer]
                chosen, allowed = np.zeros(n + z), np.zeros(n + z)
                chosen[[j for j in at if given[j] == v]] = 1.0
                allowed[[j for j in at if given[j] == v or given[j] == REMOVED]] = 1.0
                chosen[offset + k] = allowed[offset + k] = -1.0
                rows.append(chosen), lower.append(-np.inf), upper.append(0.0)
                if u.every_layer:
                    rows.append(allowed), lower.append(0.0), upper.append(np.inf)
        offset += len(values)
    if not rows:
        return 0, []
    return z, [LinearConstraint(np.array(rows), lower, upper)]


def _padded(constraint_rows: np.ndarray, z: int) -> np.ndarray:
    return np.hstack([constraint_rows, np.zeros((len(constraint_rows), z))]) if z else constraint_rows


def _widened(constraints: list[LinearConstraint], columns: int) -> list[LinearConstraint]:
    """The constraints with `columns` zero columns appended (the pair variables)."""
    return [LinearConstraint(_padded(np.atleast_2d(c.A), columns), c.lb, c.ub) for c in constraints] \
        if columns else constraints


def undominated(options: list[Option], cost: np.ndarray, losses: np.ndarray,
                uniform: tuple[Uniform, ...] = ()) -> list[int]:
    """Indices of the options no other option of the same claims (and the same values of every
    Uniform) beats: one that saves at least as much (cost ≤) at a loss no greater wins. Removing
    the rest keeps every optimum's value (swap a dominated option for its better: same claims,
    budget still met, loss not higher),
    and HiGHS's own presolve found the same columns in 7 s for a 1B model's 9.6K options, a
    quadratic search this does in milliseconds by sorting each claim group. With pair costs
    (INT8 on a pruned part) the swap stays sound where, as there, an option that saves more
    alone also leaves less for its pair to scale."""
    groups: dict[tuple, list[int]] = {}
    for j, o in enumerate(options):
        groups.setdefault((tuple(sorted(o.claims)), tuple(repr(u.value(o)) for u in uniform)), []).append(j)
    kept = []
    for members in groups.values():
        lowest = np.inf
        for j in sorted(members, key=lambda j: (cost[j], losses[j], j)):  # most saving first
            if losses[j] < lowest:
                kept.append(j)
                lowest = losses[j]
    return sorted(kept)


def solve(options: list[Option], losses: np.ndarray, objective: str, limit: float,
          dense_cost: float, uniform: tuple[Uniform, ...] = (), pairs: Pairs | None = None) -> list[Option]:
    """The options minimising total loss with total cost change ≤ limit (a negative fraction of
    the dense cost), each Uniform holding, `pairs` (pair_costs) priced jointly. Costs enter as
    fractions of the dense cost: in seconds they would be far below the solver's feasibility
    tolerance."""
    if not options:
        return []
    cost = np.array([o.cost[objective] for o in options]) / dense_cost
    kept = undominated(options, cost, losses, uniform)
    options, cost, losses = [options[j] for j in kept], cost[kept], np.asarray(losses)[kept]
    z, same = _uniform_rows(options, uniform)
    joint, joint_cost = _pair_rows(options, pairs, objective, dense_cost)
    # a tiny preference for cheaper plans among equal losses keeps the choice stable
    c = np.concatenate([losses + 1e-12 * cost / (np.abs(cost).max() or 1.0), np.zeros(z + len(joint))])
    cons = [LinearConstraint(np.concatenate([cost, np.zeros(z), joint_cost])[None, :], -np.inf, limit)]
    cons += _widened(same, len(joint)) + _linearised(len(options), z, joint)
    claims = _claims_matrix(options)
    if len(claims):
        cons.append(LinearConstraint(_padded(claims, z + len(joint)), -np.inf, 1.0))
    res = _milp(c, cons)
    if res.x is None:
        return None
    return [o for o, x in zip(options, res.x) if x > 0.5]


def smallest_ratio(options: list[Option], objective: str, dense_cost: float,
                   uniform: tuple[Uniform, ...] = (), pairs: Pairs | None = None) -> float:
    """The lowest cost ratio any combination of the options reaches (each Uniform holding,
    `pairs` priced jointly)."""
    if not options:
        return 1.0
    cost = np.array([o.cost[objective] for o in options]) / dense_cost
    kept = undominated(options, cost, np.zeros(len(options)), uniform)  # the most saving of each group
    options, cost = [options[j] for j in kept], cost[kept]
    z, same = _uniform_rows(options, uniform)
    joint, joint_cost = _pair_rows(options, pairs, objective, dense_cost)
    cons = [LinearConstraint(_padded(_claims_matrix(options), z + len(joint)), -np.inf, 1.0)]
    cons += _widened(same, len(joint)) + _linearised(len(options), z, joint)
    res = _milp(np.concatenate([cost, np.zeros(z), joint_cost]), cons)
    return 1.0 + float(res.fun)


def _milp(c: np.ndarray, constraints: list):
    """scipy's HiGHS, binary variables. HiGHS prints some debug lines (e.g. "HighsMipSolverData::
    transformNewIntegerFeasibleSolution tmpSolver.run();") to file descriptor 1 itself, past
    sys.stdout and into the user's progress output: fd 1 goes to /dev/null while it runs."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return milp(c, constraints=constraints, integrality=np.ones(len(c)), bounds=Bounds(0, 1))
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def check_reachable(options: list[Option], cost_model: CostModel, budget: float, objective: str,
                    uniform: tuple[Uniform, ...] = ()) -> None:
    """Refuse a budget no combination of options reaches, naming the smallest one that is."""
    structure = Structure.dense(cost_model.graph)
    dense = cost_model.total(structure).get(objective)
    # options' savings are fractions of the dense model, the budget one of the input (baseline)
    floor = smallest_ratio(options, objective, dense, uniform, pair_costs(options, cost_model)) * \
        cost_model.ratio(structure, objective)
    if budget < floor - 1e-9:  # slack: the MILP's own feasibility tolerance
        names = ", ".join(sorted({o.pass_name for o in options})) or "none"
        every = [u.name for u in uniform if u.every_layer]
        same = f" (with {', '.join(every)} the same on every layer)" if every else ""
        raise TailorError(f"budget {budget:g} is unreachable for objective {objective}: with the passes "
                          f"{names}{same} the smallest reachable budget is {floor:.3f}")


@dataclass
class SearchResult:
    chosen: list[Option]
    predicted_kl: float | None
    measured_kl: float | None
    iterations: list[dict] = field(default_factory=list)
    refined: dict[str, float] = field(default_factory=dict)  # options refine measured: their KL
    max_checks: int | None = None


def search(options: list[Option], cost_model: CostModel, budget: float, objective: str,
           measure: Callable[[list[Option]], float] | None, *, max_iter: int = 8,
           refine: Callable[[list[Option]], dict[str, float]] | None = None,
           max_checks: int | None = None, rivals: dict[str, list[Option]] | None = None,
           uniform: tuple[Uniform, ...] = ()) -> SearchResult:
    """The plan within `budget` of least loss: solved on the options' losses, then measured whole
    (`measure`) and re-solved where the plan costs more than its parts' sum, at most `max_iter`
    times, then `rivals` (named whole plans within budget, e.g. published methods built from the
    same profile) and the best plan of each pass alone; at most `max_checks` plans measured in all.
    `refine(chosen)` measures chosen options whose loss was only estimated (their measured KL by
    key): a plan is re-solved until those it chooses are measured, before it is measured whole.
    Every plan it solves for keeps each `uniform` value the same on all layers."""
    dense = cost_model.total(Structure.dense(cost_model.graph)).get(objective)
    if budget >= 1.0:
        return SearchResult([], 0.0, 0.0 if measure else None)
    check_reachable(options, cost_model, budget, objective, uniform)
    # options' costs are fractions of the dense model they rewrite, the budget one of the input's
    # (which lossless clean-ups may have made the dense model beat: CostModel.baseline)
    base = cost_model.ratio(Structure.dense(cost_model.graph), objective)
    limit = budget / base - 1.0
    pairs = pair_costs(options, cost_model)
    losses = np.array([max(o.loss, 0.0) for o in options])
    best: SearchResult | None = None
    history = []
    tried: set[tuple[str, ...]] = set()
    checks = max_checks if max_checks is not None else max_iter + len(PASSES)
    index = {o.key: i for i, o in enumerate(options)}
    refined: dict[str, float] = {}
    for it in range(max_iter):
        chosen = solve(options, losses, objective, limit, dense, uniform, pairs)
        while chosen is not None and refine is not None:
            fresh = refine(chosen)
            if not fresh:
                break
            refined |= fresh
            for key, kl in fresh.items():
                options[index[key]].loss = losses[index[key]] = kl
            chosen = solve(options, losses, objective, limit, dense, uniform, pairs)
        if chosen is None or len(tried) >= checks:
            break
        keys = tuple(sorted(o.key for o in chosen))
        predicted = float(sum(losses[options.index(o)] for o in chosen))
        if keys in tried or measure is None:
            if best is None:
                best = SearchResult(chosen, predicted, None)
            break
        tried.add(keys)
        measured = measure(chosen)
        history.append({"iteration": it, "options": [o.label for o in chosen],
                        "predicted_kl": predicted, "measured_kl": measured})
        if best is None or measured < best.measured_kl:
            best = SearchResult(copy.copy(chosen), predicted, measured)
        if measured <= 1.1 * predicted:
            break  # the estimates hold
        # These interact badly together: make them look as costly as they are. The loss nobody
        # predicted is shared out over the chosen options, each weighted by its own estimate plus
        # the mean estimate of the chosen ones (a pseudo-count). Shares by estimate alone (what
        # scaling every loss by measured / predicted does) could never correct an option whose
        # estimate is zero or nearly (0 × any factor = 0): measured alone, it looked harmless, yet
        # it may be the part that hurts in company; with no evidence either way it is suspected
        # as much as the average chosen option. The split is thus half by estimate, half equal
        # (all equal when every estimate is zero), and the chosen losses still sum to measured.
        idx = [options.index(o) for o in chosen]
        weights = losses[idx] + predicted / len(idx)
        shares = weights / weights.sum() if weights.sum() > 0 else np.full(len(idx), 1.0 / len(idx))
        losses[idx] += (measured - predicted) * shares

    def compete(name: str, chosen: list[Option] | None, predicted: float | None) -> None:
        """Measure a whole plan beside the solver's, within the checks; the closer one is best."""
        nonlocal best
        keys = tuple(sorted(o.key for o in chosen or []))
        if not chosen or keys in tried or len(tried) >= checks or not keeps_uniform(chosen, uniform):
            return
        tried.add(keys)
        measured = measure(chosen)
        history.append({"iteration": name, "options": [o.label for o in chosen],
                        "predicted_kl": predicted, "measured_kl": measured})
        if best is None or best.measured_kl is None or measured < best.measured_kl:
            best = SearchResult(list(chosen), predicted, measured)

    if measure is not None:
        # Plans whose structure the additive estimates undervalue are measured whole, before the
        # single-pass plans can use up the checks: on SmolLM2 at kv_memory 0.5 a DuoAttention-style
        # plan (whole KV heads dense, the rest streaming) was at KL 0.0020 on code-eval where the
        # solver's many short windows were at 0.0055.
        for name, chosen in (rivals or {}).items():
            # a rewrite outside the option set (StreamingLLM's 4-token sink) has no estimate
            known = all(o.key in index for o in chosen)
            compete(name, chosen, float(sum(losses[index[o.key]] for o in chosen)) if known else None)
        # Interactions grow with compression and can defeat the additive estimates; the plans each
        # pass reaches on its own are cheap to measure, so they compete too.
        initial = np.array([max(o.loss, 0.0) for o in options])
        for name in sorted({o.pass_name for o in options}):
            idx = [i for i, o in enumerate(options) if o.pass_name == name]
            sub = [options[i] for i in idx]
            if smallest_ratio(sub, objective, dense, uniform, pairs) * base > budget + 1e-9:
                continue
            chosen = solve(sub, initial[idx], objective, limit, dense, uniform, pairs)
            compete(f"{name} only", chosen, float(sum(o.loss for o in chosen or [])))
    if best is None:
        raise RuntimeError(f"the solver found no plan for budget {budget} although one is reachable")
    best.iterations, best.refined, best.max_checks = history, refined, checks
    reached = cost_model.ratio(structure_of(cost_model.graph, best.chosen), objective)
    if reached > budget + 1e-6:  # the solver's answer must hold under the cost model itself
        raise RuntimeError(f"search returned a plan at {reached:.4f} for budget {budget}")
    return best
