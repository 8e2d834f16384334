"""The search's held-out check: a plan's retrieval is scored by the form it keeps worst."""
from __future__ import annotations

import pytest
import torch

from tailor.backends import backend_for
from tailor.data.calibration import Calibration
from tailor.data.retrieval import RetrievalSample
from tailor.passes.base import Option
from tailor.passes.registry import apply_options
from tailor.rewriter.capture import capture
from tailor.stages.search import HeldOut
from tests.conftest import build_model


def _answered_by(model, form: str, seed: int, count: int = 3) -> list[RetrievalSample]:
    """Sequences whose answer is the model's own greedy continuation (so it answers them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(2, 96, (1, 29), generator=g)
        with torch.no_grad():
            for _ in range(3):
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
        out.append(RetrievalSample(ids[0], 29, 3, form))
    return out


def test_the_check_scores_the_form_a_plan_keeps_worst():
    model = build_model("llama")
    dense = backend_for(capture(model))
    windows = torch.randint(2, 96, (2, 32), generator=torch.Generator().manual_seed(1))

    def check(samples):
        cal = Calibration(windows, windows, "test", "0", heldout_retrieval=samples,
                          heldout_retrieval_per_length=len(samples), heldout_retrieval_runs=len(samples),
                          retrieval_weight=0.4)
        return HeldOut(dense, cal)

    forms = {"a": _answered_by(model, "a", 0), "b": _answered_by(model, "b", 1)}
    both = check([s for pair in zip(forms["a"], forms["b"]) for s in pair])
    assert len(both.retrieval) == 6  # the dense model answers all of them
    plan = apply_options(dense.clone(), [Option("layer_skip", 1, {}, ())], None)
    score = both.divergence(plan)
    parts = both.measured[-1]
    by_form = parts["retrieval_kl_by_form"]
    # each form's KL is what a check on that form alone measures
    for name, samples in forms.items():
        alone = check(samples)
        alone.divergence(plan)
        assert by_form[name] == pytest.approx(alone.measured[-1]["retrieval_kl"], rel=1e-6)
    assert by_form["a"] != pytest.approx(by_form["b"], rel=1e-2)
    assert parts["retrieval_kl"] == max(by_form.values()) > 0
    text = sum(parts["text_kl"]) / len(parts["text_kl"])
    assert score == pytest.approx(0.6 * text + 0.4 * max(by_form.values()), rel=1e-9)
    # the dense model itself loses nothing
    assert both.divergence(dense) == pytest.approx(0.0, abs=1e-9)
