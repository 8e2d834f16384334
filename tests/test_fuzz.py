"""Fuzzing: mutated ONNX models and plans never crash tailor: each run ends in a result or in
one of our clear errors (one line, exit code 2), with the input unchanged.

In the suite the cases are derandomized: the same 30 ONNX and 150 plan cases on every run, so
the suite is not green or red by chance. The long run draws new cases each time (1000 + 5000;
TAILOR_FUZZ_EXAMPLES overrides the ONNX count, plans get 5×; figures in docs/BENCHMARKS.md):
    TAILOR_FUZZ=long python -m pytest -p no:logging tests/test_fuzz.py
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailor.backends.torch_backend import TorchBackend
from tailor.core.errors import TailorError
from tailor.core.plan import Plan
from tailor.passes.registry import apply_options, options_from_plan
from tailor.rewriter.capture import capture
from tailor.runtime.artifact import verify_artifact
from tests.conftest import build_model, ids_for
from tests.mutations import mutate_onnx, mutate_plan

MODE = os.environ.get("TAILOR_FUZZ", "suite")
if MODE not in ("suite", "long"):
    raise ValueError(f"TAILOR_FUZZ is 'long' (or unset, for the suite's fixed cases), got {MODE!r}")
LONG = MODE == "long"
EXAMPLES = int(os.environ.get("TAILOR_FUZZ_EXAMPLES", "1000" if LONG else "30"))
# derandomize: hypothesis seeds each test from its own source, so the suite replays the same
# cases (a failure it shows is one it will show again); the long run explores with random seeds
FUZZ = settings(max_examples=EXAMPLES, derandomize=not LONG, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def protos(tiny_onnx):
    return {name: onnx.load(str(tiny_onnx[name])) for name in ("llama", "gpt2", "bert")}


@FUZZ
@given(rng=st.randoms(use_true_random=False), name=st.sampled_from(["llama", "gpt2", "bert"]))
def test_mutated_onnx_fails_cleanly(protos, rng, name):
    from tailor.cli.main import optimize_main

    data, what = mutate_onnx(protos[name], rng)
    with tempfile.TemporaryDirectory() as d:
        path, out = Path(d) / "model.onnx", Path(d) / "out"
        path.write_bytes(data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = optimize_main([str(path), "-o", str(out)])
        assert path.read_bytes() == data, what
        if rc == 0:
            verify_artifact(out)
        else:
            lines = err.getvalue().strip().splitlines()
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:"), (what, err.getvalue())
            assert not out.exists()


SEED_PLANS = [  # valid plans for the tiny Llama (3 layers, 2 KV heads × 2 queries, FFN 96)
    [{"pass": "head_prune", "layer": 0, "choice": {"kv_heads": [1], "queries": [[0]]}},
     {"pass": "ffn_prune", "layer": 1, "choice": {"channels": list(range(0, 96, 2))}},
     {"pass": "kv_share", "layer": 2, "choice": {"source": 1}}],
    [{"pass": "attn_pattern", "layer": 0, "choice": {"spans": [[4, 4.0, 0.0], None]}},
     {"pass": "layer_skip", "layer": 2, "choice": {}}, {"pass": "ffn_skip", "layer": 1, "choice": {}}],
]


@pytest.fixture(scope="module")
def targets():
    models = {name: build_model(name) for name in ("llama", "gpt2")}
    return {name: (m, capture(m).graph) for name, m in models.items()}


def _plan(rewrites) -> dict:
    return {"model_hash": "sha256:x", "budget": 0.5, "objective": "latency", "target": "h100",
            "workload": {"batch": 1, "prompt_len": 64, "gen_len": 0}, "rewrites": rewrites,
            "predicted": {"latency": 0.5}, "schema_version": 1}


def _check_plan(targets, name, data, what):
    """A plan that passes the checks applies and runs; every other one is a TailorError."""
    model, graph = targets[name]
    try:
        plan = Plan.from_json(data)
        options = options_from_plan(graph, plan.rewrites)
    except TailorError:
        return
    try:
        rewritten = apply_options(TorchBackend(model, graph).clone(), options, None).model
        with torch.no_grad():
            out = rewritten(ids_for())
    except Exception as e:
        raise AssertionError(f"{what}: {json.dumps(data)}") from e
    assert torch.isfinite(out.logits).all(), what


@settings(FUZZ, max_examples=EXAMPLES * 5)
@given(rng=st.randoms(use_true_random=False), name=st.sampled_from(["llama", "gpt2"]),
       seed=st.sampled_from(SEED_PLANS))
def test_mutated_plans_fail_cleanly(targets, rng, name, seed):
    data, what = mutate_plan(_plan(seed), rng)
    _check_plan(targets, name, data, what)


def test_boolean_layer_refused(targets):
    """Found by the plan fuzzer: "layer": true read as layer 1 (True == 1 in Python) gave the
    head prune the claim "attn:True", which the KV share from layer 1 ("attn:1") did not conflict
    with, and applying both crashed (tensor sizes 4 vs 2). It is refused as a type error now."""
    rewrites = [dict(r) for r in SEED_PLANS[0]]
    rewrites[0]["layer"] = True
    data = _plan(rewrites)
    with pytest.raises(TailorError, match="rewrite 0: layer must be a whole number"):
        Plan.from_json(data)
    _check_plan(targets, "llama", data, "rewrite 0 on layer true")
    rewrites[0]["layer"] = 1  # the same plan with the number: the conflict is found
    with pytest.raises(TailorError, match="conflicts with rewrite 0"):
        options_from_plan(targets["llama"][1], Plan.from_json(_plan(rewrites)).rewrites)


def test_seed_plans_are_valid(targets):
    """The fuzzer starts from plans that apply: mutations explore around real plans."""
    model, graph = targets["llama"]
    for seed in SEED_PLANS:
        assert len(options_from_plan(graph, seed)) == len(seed)
