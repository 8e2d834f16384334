"""The attention profile's proxy: what one KV head on a pattern changes in its layer's output.

For every KV head g and pattern p, from the query, key and value a layer sees in the dense model:
the attention output of g's query heads with g on p minus the dense output, through g's columns of
the output projection (so the change is in residual-stream units), squared, per query row
(`pattern_errors`). The runner divides each row's by the squared norm of the residual stream
leaving the last block and sums them with the rows' weights (ProfileBatch.proxy_rows): the change
relative to the stream the final norm and the LM head see; on refllama-16m it ranked the cells
as their measured KL does better than the stream entering the layer (Spearman 0.90 vs 0.85 at
256 tokens, 0.90 vs 0.78 at 512), which overrated layer 0, whose input is the bare embedding.
Squared: a small change δ of the logits costs ½ δᵀFδ of KL, quadratic as well.

Computed block by block over query rows, never a [T, T] map of every head at once: a block's dense
probabilities are [B, heads, rows, T], and every pattern's kept sums come from them. In float32
whatever the model's dtype: the lossless end of the grid differs from dense by a few ulps of
bfloat16.
"""
from __future__ import annotations

import torch

from tailor.core.patterns import Pattern

# Query rows a sequence: all up to PROXY_ROWS, past that PROXY_ROWS of them in evenly spread blocks
# of PROXY_BLOCK (ProfileBatch.proxy_rows). The window of the narrowest patterns is a few dozen
# keys: a block of contiguous rows shares almost all of it, where strided rows would each bring
# their own.
PROXY_ROWS = 1024
PROXY_BLOCK = 128

def output_factor(o_weight: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[kv_heads, C, G·D] float32: per KV head, R of the QR of its group's columns W_g [hidden, G·D]
    of the output projection (o_weight [hidden, Hq·D], out_in): |W_g δ| = |R_g δ|, a product G·D
    wide instead of hidden wide."""
    hidden = o_weight.shape[0]
    # a group's query heads are contiguous (transformers' repeat_kv), so are their columns
    w = o_weight.float().reshape(hidden, kv_heads, -1).transpose(0, 1)
    return torch.linalg.qr(w, mode="r").R


def _allowed(attention_mask: torch.Tensor | None, r0: int, r1: int, t: int, causal: bool,
             device) -> torch.Tensor | None:
    """The model's own mask for query rows [r0, r1) and the first t keys, as bool
    [B or 1, 1, rows, t]; None when every key may be attended."""
    if attention_mask is not None:
        m = attention_mask[..., r0:r1, :t]
        return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    if not causal:
        return None
    rows = torch.arange(r0, r1, device=device)[:, None]
    return (torch.arange(t, device=device)[None, :] <= rows)[None, None]


def _drops(sink: int, window: int, rows: torch.Tensor, t: int, causal: bool) -> torch.Tensor:
    """[rows] bool: whether each query row of a length-t sequence loses a key (its own mask aside)."""
    lost = rows - window >= sink
    return lost if causal else lost | (rows + window <= t - 1)


def _band(prob: torch.Tensor, vx: torch.Tensor, r0: int, r1: int, sink: int, near: int, far: int,
          causal: bool) -> torch.Tensor:
    """Σ prob · [value, 1] over the keys j ≥ sink at a distance near ≤ |i - j| < far of each row i
    (causal: i - j), [B, Hkv, G·R, D + 1]; prob [B, Hkv, G, R, K], vx [B, Hkv, K, D + 1]."""
    b, hkv, g, r, k = prob.shape
    rows = torch.arange(r0, r1, device=prob.device)[:, None]
    # keys before the rows (i - j in [near, far)), and for an encoder after them (j - i in [near, far),
    # the diagonal counted once)
    sides = [(max(sink, r0 - far + 1), min(k, r1 - near), 1, near)]
    if not causal:
        sides.append((max(sink, r0 + max(near, 1)), min(k, r1 - 1 + far), -1, max(near, 1)))
    out = 0
    for a, c, sign, lo in sides:
        if c <= a:
            continue
        dist = sign * (rows - torch.arange(a, c, device=prob.device)[None, :])
        p = torch.where((dist >= lo) & (dist < far), prob[..., a:c], 0.0)
        out = out + p.reshape(b, hkv, g * r, c - a) @ vx[:, :, a:c]
    return out


def pattern_errors(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, patterns: list[Pattern], *,
                   scaling: float | None, causal: bool, attention_mask: torch.Tensor | None,
                   o_factor: torch.Tensor, blocks: list[tuple[int, int]]) -> torch.Tensor:
    """[kv_heads, patterns, B, rows] float32 on the query's device: |W_g Δ_g|² for each query row
    of `blocks` (in their order), Δ_g the change of KV head g's query heads' attention output with
    g alone on the pattern (heads are independent, so all are put on it at once).
    query [B, Hq, T, D], key/value [B, Hkv, T, D] as the attention interface gets them; o_factor
    from output_factor.

    A pattern keeps, of the dense probabilities, the sink and the keys within its window; patterns
    of one sink differ only in the window, so the kept sums of a row are the sink's plus bands of
    distance between consecutive windows, each band computed once for all patterns."""
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    device = query.device
    scale = scaling if scaling is not None else d ** -0.5
    q = (query.float() * scale).reshape(b, hkv, g, t, d)
    k = key.float()
    # a column of ones after the values: one product gives the kept sum and the kept probability
    vx = torch.cat([value.float(), torch.ones(b, hkv, t, 1, device=device)], -1)
    factor = o_factor.reshape(hkv, -1, g, d)
    windows = [p.window(t) for p in patterns]
    tiny = torch.finfo(torch.float32).tiny
    out = []
    for r0, r1 in blocks:
        r = r1 - r0
        rows = torch.arange(r0, r1, device=device)
        errors = torch.zeros(hkv, len(patterns), b, r, dtype=torch.float32, device=device)
        out.append(errors)
        active = [i for i, p in enumerate(patterns) if r1 - 1 - windows[i] >= p.sink or not causal]
        if not active:
            continue  # every row keeps every key under every pattern: no change
        # causal and unmasked: keys past the block's last row are never attended
        t_eff = r1 if causal and attention_mask is None else t
        # a group's query heads share their keys: [B, Hkv, G·R, K] products, no copy of K or V per head
        scores = q[:, :, :, r0:r1].reshape(b, hkv, g * r, d) @ k[:, :, :t_eff].transpose(-1, -2)
        allowed = _allowed(attention_mask, r0, r1, t_eff, causal, device)
        if allowed is not None:
            scores.view(b, hkv, g, r, t_eff).masked_fill_(~allowed[:, :, None], float("-inf"))
        prob = torch.softmax(scores, -1)
        del scores
        dense = prob @ vx[:, :, :t_eff]
        dense = dense[..., :d] / dense[..., d:]
        prob = prob.view(b, hkv, g, r, t_eff)
        for sink in sorted({patterns[i].sink for i in active}):
            kept = prob[..., :sink].reshape(b, hkv, g * r, -1) @ vx[:, :, :min(sink, t_eff)]
            near = 0
            for i in sorted((i for i in active if patterns[i].sink == sink), key=windows.__getitem__):
                if windows[i] > near:
                    kept = kept + _band(prob, vx, r0, r1, sink, near, windows[i], causal)
                    near = windows[i]
                delta = (kept[..., :d] / kept[..., d:].clamp_min(tiny) - dense).view(b, hkv, g, r, d)
                change = torch.einsum("bkgrd,kcgd->kbrc", delta, factor).square().sum(-1)
                # rows that keep every key: exactly 0, not the rounding of the sums above
                errors[:, i] = change * _drops(sink, windows[i], rows, t, causal)
    return torch.cat(out, -1)
