"""Plan.from_json checks the types of what it reads: JSON booleans are not numbers (Python's
True == 1 would otherwise pass as layer 1 and slip past the conflict check of the rewrites, whose
claims are strings such as "attn:True"), and a float (2.0) or a string ("2") is not a whole number."""
from __future__ import annotations

import copy

import pytest

from tailor.core.errors import TailorError
from tailor.core.plan import Plan

VALID = {"model_hash": "sha256:x", "budget": 0.5, "objective": "latency", "target": "h100",
         "workload": {"batch": 1, "prompt_len": 64, "gen_len": 0},
         "rewrites": [{"pass": "head_prune", "layer": 1, "choice": {"kv_heads": [1], "queries": [[0]]}},
                      {"pass": "kv_share", "layer": 2, "choice": {"source": 1}}],
         "predicted": {"latency": 0.5}, "schema_version": 1}


def _with(path: tuple, value):
    data = copy.deepcopy(VALID)
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return data


def test_valid_plan_reads_and_round_trips():
    plan = Plan.from_json(copy.deepcopy(VALID))
    assert plan.rewrites[0]["layer"] == 1 and plan.workload["prompt_len"] == 64
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(_with(("budget",), 1)).budget == 1.0          # a whole budget is a number
    assert Plan.from_json(_with(("predicted", "latency"), 1)).predicted == {"latency": 1.0}


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, [1]])
def test_layer_must_be_a_whole_number(value):
    with pytest.raises(TailorError, match=r"rewrite 0: layer must be a whole number"):
        Plan.from_json(_with(("rewrites", 0, "layer"), value))


def test_layer_missing_refused():
    data = copy.deepcopy(VALID)
    del data["rewrites"][1]["layer"]
    with pytest.raises(TailorError, match=r"rewrite 1: layer must be a whole number"):
        Plan.from_json(data)


@pytest.mark.parametrize("path, value, field", [
    (("rewrites", 0, "pass"), 3, "rewrite 0: pass must be a string"),
    (("rewrites", 0, "choice"), [], "rewrite 0: choice must be an object"),
    (("rewrites", 0), "head_prune", "rewrite 0 must be an object"),
    (("rewrites",), {}, "rewrites must be a list"),
])
def test_rewrite_shape_refused(path, value, field):
    with pytest.raises(TailorError, match=field):
        Plan.from_json(_with(path, value))


@pytest.mark.parametrize("key", ["batch", "prompt_len", "gen_len"])
@pytest.mark.parametrize("value", [True, False, 2.0, 2.5, "2", None])
def test_workload_values_must_be_whole_numbers(key, value):
    with pytest.raises(TailorError, match=rf"workload\.{key} must be a whole number"):
        Plan.from_json(_with(("workload", key), value))


@pytest.mark.parametrize("value", [True, 1.0, "1", None])
def test_schema_version_must_be_a_whole_number(value):
    with pytest.raises(TailorError, match="schema_version must be a whole number"):
        Plan.from_json(_with(("schema_version",), value))


@pytest.mark.parametrize("path, value, field", [
    (("budget",), True, "budget must be a number"),
    (("budget",), "0.5", "budget must be a number"),
    (("predicted", "latency"), True, r"predicted\.latency must be a number"),
    (("predicted", "latency"), "0.5", r"predicted\.latency must be a number"),
    (("model_hash",), 7, "model_hash must be a string"),
    (("objective",), True, "objective must be a string"),
    (("target",), None, "target must be a string"),
    (("workload",), [], "workload must be an object"),
    (("predicted",), 0.5, "predicted must be an object"),
])
def test_other_fields_typed(path, value, field):
    with pytest.raises(TailorError, match=field):
        Plan.from_json(_with(path, value))
