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


def test_data_free_sampling_through_tailors_runtime():
    """The sampler a GPU compile uses (tailor.stages.calibrate.runtime_sampler; cuda_graph has no
    effect on the CPU): sequences that start at the random first tokens, seeded, and drawn from the
    model: under a model that always predicts one token, every sampled token is that one."""
    from tailor.runtime.generate import generate
    from tailor.stages.calibrate import runtime_attends_as_the_model, runtime_sampler

    model = build_model("llama")
    assert runtime_sampler(model, 0, 8) is None  # on the CPU: transformers' generate
    assert runtime_attends_as_the_model(model.config, 8)
    model.config.sliding_window = 4
    assert not runtime_attends_as_the_model(model.config, 8) and runtime_attends_as_the_model(model.config, 4)
    model.config.sliding_window, model.config.attn_logit_softcapping = None, 50.0
    assert not runtime_attends_as_the_model(model.config, 8)
    model.config.attn_logit_softcapping = None

    def sample(ids, new):
        return torch.cat([ids, torch.tensor(generate(model, ids, new, do_sample=True, seed=0,
                                                      cuda_graph=True))], 1)

    first = calibration_data_free(model, 96, window=8, windows=4, seed=0, sample=sample)
    second = calibration_data_free(model, 96, window=8, windows=4, seed=0, sample=sample)
    assert first.profile_ids.shape == (3, 8) and torch.equal(first.profile_ids, second.profile_ids)
    starts = torch.randint(0, 96, (4, 1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([first.profile_ids, first.heldout_ids])[:, :1], starts)
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.full((96,), -1e4).index_fill(0, torch.tensor([7]), 0.0))
    peaked = calibration_data_free(model, 96, window=8, windows=4, seed=0, sample=sample)
    assert (peaked.profile_ids[:, 1:] == 7).all()
