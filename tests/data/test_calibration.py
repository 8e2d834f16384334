"""Calibration inputs: data-free sampling is reproducible and leaves the caller's RNG alone."""
from __future__ import annotations

import torch

from tailor.data.calibration import calibration_data_free
from tests.conftest import build_model


def test_data_free_sampling_leaves_global_rng_untouched():
    model = build_model("llama")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = calibration_data_free(model, 96, window=8, windows=4, seed=0)
    assert torch.equal(torch.get_rng_state(), state), "the library changed the global RNG state"
    second = calibration_data_free(model, 96, window=8, windows=4, seed=0)
    assert torch.equal(first.profile_ids, second.profile_ids)  # seeded: the same samples
    other = calibration_data_free(model, 96, window=8, windows=4, seed=1)
    assert not torch.equal(first.profile_ids, other.profile_ids)
