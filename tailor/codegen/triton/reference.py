"""Plain-torch references for the Triton kernels beside this file: the kernels must match them.

Spans are per KV head: `sinks[h]` tokens at the start plus a window of `windows[h]` tokens
before (causal) or around (bidirectional) each query; a dense head has sink 0 and a window of
at least the sequence length (`DENSE_WINDOW`). This is the mask of
tailor.core.patterns at one length N, with window = window(N) resolved to an int.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tailor.core.patterns import Pattern, keep_mask

DENSE_WINDOW = 1 << 30


def span_mask(sinks: torch.Tensor, windows: torch.Tensor, q_len: int, k_len: int, causal: bool,
              device=None) -> torch.Tensor:
    """[kv_heads, q_len, k_len] bool, causality included; queries are the last q_len positions."""
    patterns = [None if int(w) >= DENSE_WINDOW else Pattern(int(s), float(w), 0.0)
                for s, w in zip(sinks.tolist(), windows.tolist())]
    keep = keep_mask(patterns, q_len, k_len, causal, device)
    if causal:
        i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        keep = keep & (torch.arange(k_len, device=device)[None, :] <= i)
    return keep


def prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                      windows: torch.Tensor, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, M, D], k/v [B, Hkv, N, D] -> [B, Hq, M, D], computed in float32."""
    groups = q.shape[1] // k.shape[1]
    keep = span_mask(sinks, windows, q.shape[2], k.shape[2], causal, q.device).repeat_interleave(groups, 0)
    out = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(groups, 1),
                                         v.float().repeat_interleave(groups, 1), attn_mask=keep[None],
                                         scale=scale)
    return out.to(q.dtype)


def decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout_t: dict,
                     lengths: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One new token per sequence over a per-head KV cache (tailor.runtime.kv_cache):
    q [B, Hq, D], caches [B, slots, D], layout_t = HeadLayout.tensors(), lengths [B] = tokens so
    far, the new one included. Works from the slots' side: which position each slot holds at
    length n, and whether the query at n - 1 keeps it; then dense attention under that mask."""
    b_size, hq, d = q.shape
    offsets, sinks, rings = (layout_t[k].long() for k in ("offsets", "sinks", "rings"))
    kv_heads, slots = offsets.shape[0], k_cache.shape[1]
    scale = d ** -0.5 if scale is None else scale
    head = torch.bucketize(torch.arange(slots, device=q.device), offsets, right=True) - 1     # [slots]
    rel = torch.arange(slots, device=q.device) - offsets[head]
    s, r = sinks[head], rings[head]
    n = lengths.long()[:, None]                                                             # [B, 1]
    window = torch.minimum(torch.floor(layout_t["alphas"][head] + layout_t["betas"][head] * n),
                           r.double()).long()
    ring_i = rel - s
    # the newest position p >= sink with (p - sink) % ring == ring_i and p <= n - 1
    newest = s + ring_i + r * torch.div(n - 1 - s - ring_i, r, rounding_mode="floor")
    keep = torch.where(rel < s, rel < n, (n - 1 - s - ring_i >= 0) & (newest >= torch.maximum(s, n - window)))
    scores = torch.einsum("bhd,bsd->bhs", q.float(), k_cache.float()) * scale               # [B, Hq, slots]
    groups = hq // kv_heads
    mine = head[None, :] == (torch.arange(hq, device=q.device) // groups)[:, None]          # [Hq, slots]
    scores = scores.masked_fill(~(keep[:, None, :] & mine[None]), float("-inf"))
    return torch.einsum("bhs,bsd->bhd", torch.softmax(scores, -1), v_cache.float()).to(q.dtype)
