"""Retrieval heads found as DuoAttention finds them (Xiao et al. 2024): every KV head's attention
becomes a mix α·dense + (1 − α)·streaming (one sink + recent-window pattern for all heads), the
model's weights stay frozen, and the gates α are fitted by gradient descent so that the last
hidden state at the answer positions of synthetic retrieval sequences stays the dense model's,
while an L1 pull draws every α towards 0 (streaming). The heads whose α stays high are those
retrieval needs whole.

What it adds to the attention profile: a profile cell measures one head on a pattern with every
other head dense, so a needle that several heads carry survives each head's cell and is lost
when the search streams them all. The gates are fitted with all heads streaming together, as a
plan streams them.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm import tqdm

from tailor.core.devices import module_device
from tailor.core.patterns import Pattern
from tailor.data.retrieval import RetrievalSample

# DuoAttention's optimiser settings: Adam at 0.02, gates from 1 (dense), clamped to [0, 1]
LEARNING_RATE = 0.02
# weight of the L1 pull of the mean gate towards streaming, against the answers' relative squared
# error (DuoAttention's λ = 0.05 against its absolute one)
PULL = 0.05


def fit_gates(model: torch.nn.Module, attns: list, kv_heads: int, samples: list[RetrievalSample],
              pattern: Pattern, steps: int, *, split=None, progress: bool = False) -> np.ndarray:
    """[layers, kv_heads] gates in [0, 1] after `steps` Adam steps, one sample a step in turn;
    NaN for layers whose attention runs no patterns (`attns[i]` None). `split`: (base model,
    head) where the model's logits are the head of the base's last hidden state (compared there,
    as DuoAttention does; else the logits are)."""
    device = module_device(model)
    layers = [i for i, a in enumerate(attns) if a is not None]

    def outputs(s: RetrievalSample) -> torch.Tensor:
        ids = s.ids[None].to(device)
        out = split[0](input_ids=ids, use_cache=False)[0] if split else \
            model(input_ids=ids, use_cache=False).logits
        return out[0, s.answer_positions.to(out.device)].float()

    with torch.no_grad():
        targets = [outputs(s) for s in samples]
    alpha = torch.ones(len(layers), kv_heads, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([alpha], lr=LEARNING_RATE)
    with _frozen(model), torch.enable_grad():
        try:
            for i, layer in enumerate(layers):
                attns[layer].tailor_gates = (alpha[i], pattern)
            for step in tqdm(range(steps), desc="fitting retrieval gates", disable=not progress, unit="step"):
                k = step % len(samples)
                out = outputs(samples[k])
                target = targets[k].to(out.device)
                loss = (out - target).square().sum() / target.square().sum().clamp_min(1e-12) \
                    + PULL * alpha.mean()
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    alpha.clamp_(0.0, 1.0)
        finally:
            for layer in layers:
                del attns[layer].tailor_gates
    gates = np.full((len(attns), kv_heads), np.nan)
    gates[layers] = alpha.detach().double().cpu().numpy()
    return gates


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """The weights out of autograd while the gates are fitted (only the gates get gradients)."""
    wanted = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in wanted:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in wanted:
            p.requires_grad_(flag)
