"""The kernels as torch.library custom ops (`torch.ops.tailor.*`), so a model that calls them still
traces under torch.export / torch.compile: on CUDA the Triton kernels run, elsewhere the plain-torch
references beside them; the fake implementations give shapes for tracing. `*_direct`: the same
without the custom-op dispatch, for callers that are never traced."""
from __future__ import annotations

import torch

from tailor.codegen.triton import reference


def sparse_prefill_direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                          windows: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """torch.ops.tailor.sparse_prefill without its dispatch (about 40 µs of host time a call on an
    H100 machine, 30 a prefill of a 30-layer model): for code torch.compile never traces, such as
    the runtime's attention (tailor.rewriter.modules.sparse_attention._attend_generating)."""
    if q.is_cuda:
        from tailor.codegen.triton.prefill import sparse_prefill as kernel

        return kernel(q, k, v, sinks, windows, causal, scale)
    return reference.prefill_reference(q, k, v, sinks, windows, causal, scale)


@torch.library.custom_op("tailor::sparse_prefill", mutates_args=())
def sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   windows: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    return sparse_prefill_direct(q, k, v, sinks, windows, causal, scale)


@sparse_prefill.register_fake
def _(q, k, v, sinks, windows, causal, scale):
    return torch.empty_like(q)


@torch.library.custom_op("tailor::sparse_decode", mutates_args=())
def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                  offsets: torch.Tensor, sinks: torch.Tensor, rings: torch.Tensor, alphas: torch.Tensor,
                  betas: torch.Tensor, scale: float, longest: int, busy_heads: int) -> torch.Tensor:
    layout_t = {"offsets": offsets, "sinks": sinks, "rings": rings, "alphas": alphas, "betas": betas}
    if q.is_cuda:
        from tailor.codegen.triton.decode import sparse_decode as kernel

        return kernel(q, k_cache, v_cache, layout_t, lengths, scale, longest=longest, busy_heads=busy_heads)
    return reference.decode_reference(q, k_cache, v_cache, layout_t, lengths, scale)


@sparse_decode.register_fake
def _(q, k_cache, v_cache, lengths, offsets, sinks, rings, alphas, betas, scale, longest, busy_heads):
    return torch.empty_like(q)
