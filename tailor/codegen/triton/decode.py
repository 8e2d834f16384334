"""Decode attention: one new token per sequence over the per-head KV cache (tailor.runtime.kv_cache).

Split-K (flash-decoding): the kept positions of a KV head are cut into `splits` chunks, one
program each, computing all query heads of the GQA group together (one K/V read serves the whole
group); a second small kernel merges the chunks by their log-sum-exp. A program walks logical
positions (the sink, then the window) and gathers their slots, so the ring buffer's wrap-around
needs no copy. Work and bytes read are the head's kept span, so both shrink with the plan.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tailor.codegen.triton.prefill import LOG2E, dot_precision


@triton.jit
def _sparse_decode_kernel(q_ptr, k_ptr, v_ptr, part_o_ptr, part_lse_ptr, lengths_ptr,
                          offsets_ptr, sinks_ptr, rings_ptr, alphas_ptr, betas_ptr,
                          stride_qb, stride_qh, stride_kb, stride_kn, stride_vb, stride_vn,
                          kv_heads, groups, splits, qk_scale,
                          BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                          PRECISION: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // kv_heads
    h = pid_bh % kv_heads
    n = tl.load(lengths_ptr + b)
    offset = tl.load(offsets_ptr + h)
    sink = tl.load(sinks_ptr + h)
    ring = tl.load(rings_ptr + h)
    # window(n) = floor(alpha + beta * n) in float64, as HeadLayout.window does, capped by the ring
    grown = tl.floor(tl.load(alphas_ptr + h) + tl.load(betas_ptr + h) * n.to(tl.float64))
    window = tl.minimum(grown, ring.to(tl.float64)).to(tl.int32)

    n_sink = tl.minimum(sink, n)
    win_lo = tl.maximum(sink, n - window)
    total = n_sink + tl.maximum(n - win_lo, 0)      # kept positions, in order: sink then window
    chunk = tl.cdiv(tl.cdiv(total, splits), BLOCK_N) * BLOCK_N
    t_lo = split * chunk
    t_hi = tl.minimum(t_lo + chunk, total)

    g = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, HEAD_DIM)
    q_rows = h * groups + g
    q = tl.load(q_ptr + b * stride_qb + q_rows[:, None] * stride_qh + dims[None, :],
                mask=(g < groups)[:, None], other=0.0)
    k_base = k_ptr + b * stride_kb + offset * stride_kn
    v_base = v_ptr + b * stride_vb + offset * stride_vn

    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = t < t_hi
        pos = tl.where(t < n_sink, t, win_lo + (t - n_sink))
        slot = tl.where(pos < sink, pos, sink + (pos - sink) % ring)
        k = tl.load(k_base + slot[:, None] * stride_kn + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vn + dims[None, :], mask=valid[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # partial results: normalised output and its log2-sum-exp; an empty chunk has lse = -inf
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * kv_heads * groups + q_rows) * splits + split
    tl.store(part_o_ptr + row[:, None] * HEAD_DIM + dims[None, :], out, mask=(g < groups)[:, None])
    tl.store(part_lse_ptr + row, lse, mask=g < groups)


@triton.jit
def _combine_kernel(part_o_ptr, part_lse_ptr, o_ptr, stride_ob, stride_oh, q_heads, splits,
                    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // q_heads
    hq = pid % q_heads
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + pid * splits + s, mask=s < splits, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.math.exp2(lse - top)
    parts = tl.load(part_o_ptr + (pid * splits + s)[:, None] * HEAD_DIM + dims[None, :],
                    mask=(s < splits)[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(o_ptr + b * stride_ob + hq * stride_oh + dims, out.to(o_ptr.dtype.element_ty))


def choose_splits(batch: int, busy_heads: int, longest: int, block_n: int, device: torch.device) -> int:
    """Splits of the longest head: enough programs with work (`busy_heads`: the step's work in
    units of the longest head) to fill the GPU twice over, never a chunk under 4 key blocks."""
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, batch * busy_heads), triton.cdiv(longest, 4 * block_n), 128))


def sparse_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout_t: dict,
                  lengths: torch.Tensor, scale: float | None = None, splits: int | None = None,
                  longest: int | None = None, busy_heads: int | None = None) -> torch.Tensor:
    """q [B, Hq, D]; caches [B, slots, D]; layout_t = HeadLayout.tensors(device); lengths [B] int32
    (tokens so far, the new one included, already written) -> [B, Hq, D].
    `longest` bounds the kept positions of any head (sizes the split); default: the cache's slots.
    `busy_heads`: the work in units of the longest head (LayerCache.busy_heads); default: all heads."""
    b, hq, d = q.shape
    kv_heads = layout_t["sinks"].shape[0]
    groups = hq // kv_heads
    block_n = 64 if q.device.type == "cuda" else 16
    splits = splits or choose_splits(b, busy_heads or kv_heads, longest or k_cache.shape[1], block_n,
                                     q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    part_o = torch.empty(b * hq * splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b * hq * splits, dtype=torch.float32, device=q.device)
    scale = d ** -0.5 if scale is None else scale
    _sparse_decode_kernel[(b * kv_heads, splits)](
        q, k_cache, v_cache, part_o, part_lse, lengths,
        layout_t["offsets"], layout_t["sinks"], layout_t["rings"], layout_t["alphas"], layout_t["betas"],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        kv_heads, groups, splits, scale * LOG2E,
        BLOCK_G=max(16, triton.next_power_of_2(groups)), BLOCK_N=block_n, HEAD_DIM=d,
        PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=2 if q.device.type == "cuda" else 1)
    out = torch.empty_like(q)
    _combine_kernel[(b * hq,)](part_o, part_lse, out, out.stride(0), out.stride(1), hq, splits,
                               BLOCK_S=max(2, triton.next_power_of_2(splits)), HEAD_DIM=d)
    return out
