"""Block-sparse prefill attention: each KV head keeps a sink plus a window (reference.py).

FlashAttention-2 style (online softmax over key blocks, one program per query block and query
head; the query heads of a GQA group read their KV head). Work is proportional to the kept
blocks: a program visits only its sink blocks and the key blocks its window reaches, and splits
those into the blocks wholly inside the pattern (no masking at all) and the band-edge blocks
that need the mask (the sink's last partial block, the window's lower edge, the diagonal).
A dense head is sink 0 + an unbounded window, which makes this the plain causal or full kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tailor.codegen.triton.reference import DENSE_WINDOW

LOG2E = 1.4426950408889634


@triton.jit
def _attend(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, j0, n_keys, rows, sink, window,
            qk_scale, MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
            HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """One key block [j0, j0 + BLOCK_N) into the running (acc, l, m) of the query block."""
    cols = j0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    if MASK:
        in_range = cols < n_keys
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :], mask=in_range[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :], mask=in_range[:, None], other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :])
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASK:
        dist = rows[:, None] - cols[None, :]
        if CAUSAL:
            keep = (dist >= 0) & ((cols[None, :] < sink) | (dist < window))
        else:
            keep = (cols[None, :] < sink) | ((dist < window) & (dist > -window))
        keep = keep & in_range[None, :]
        qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # a row with nothing kept so far keeps m = -inf: shift by 0 there so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _sparse_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, sinks_ptr, windows_ptr,
                           stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                           q_heads, groups, n_queries, n_keys, qk_scale,
                           CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, DENSE: tl.constexpr):
    # the longest rows (last query blocks under causality) start first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // q_heads
    hq = pid_bh % q_heads
    hkv = hq // groups
    sink = tl.load(sinks_ptr + hkv)
    window = tl.minimum(tl.load(windows_ptr + hkv), DENSE)  # wider is dense: no int32 overflow below

    offset = n_keys - n_queries  # queries are the last n_queries positions
    m0 = pid_m * BLOCK_M
    rows = offset + m0 + tl.arange(0, BLOCK_M)
    q_lo = offset + m0                      # first query position of the block
    q_hi = tl.minimum(q_lo + BLOCK_M, n_keys) - 1   # last valid one
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + hq * stride_qh + (m0 + tl.arange(0, BLOCK_M))[:, None] * stride_qm
                + dims[None, :], mask=(rows < n_keys)[:, None], other=0.0)
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # key span of the block: the sink, then the window (clamped to the keys there are)
    if CAUSAL:
        key_end = q_hi + 1
        win_lo = tl.maximum(q_lo - window + 1, 0)
    else:
        key_end = n_keys
        win_lo = tl.maximum(q_lo - window + 1, 0)
    win_end = key_end if CAUSAL else tl.minimum(n_keys, q_hi + window)
    sink_blocks = tl.cdiv(tl.minimum(sink, key_end), BLOCK_N)
    lo = tl.maximum(win_lo // BLOCK_N, sink_blocks)
    hi = tl.maximum(tl.cdiv(win_end, BLOCK_N), lo)
    # blocks wholly inside the window for every row of the block, and wholly in range
    full_lo = tl.minimum(tl.maximum(tl.cdiv(q_lo + BLOCK_M - window, BLOCK_N), lo), hi)
    if CAUSAL:
        full_hi = (q_lo + 1) // BLOCK_N
    else:
        full_hi = tl.where(q_lo + window - BLOCK_N >= 0, (q_lo + window - BLOCK_N) // BLOCK_N + 1, 0)
    full_hi = tl.maximum(tl.minimum(tl.minimum(full_hi, n_keys // BLOCK_N), hi), full_lo)

    for blk in range(0, sink_blocks):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, blk * BLOCK_N,
                                n_keys, rows, sink, window, qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM,
                                PRECISION)
    for blk in range(lo, full_lo):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, blk * BLOCK_N,
                                n_keys, rows, sink, window, qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM,
                                PRECISION)
    for blk in range(full_lo, full_hi):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, blk * BLOCK_N,
                                n_keys, rows, sink, window, qk_scale, False, CAUSAL, BLOCK_N, HEAD_DIM,
                                PRECISION)
    for blk in range(full_hi, hi):
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, blk * BLOCK_N,
                                n_keys, rows, sink, window, qk_scale, True, CAUSAL, BLOCK_N, HEAD_DIM,
                                PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + b * stride_ob + hq * stride_oh + (m0 + tl.arange(0, BLOCK_M))[:, None] * stride_om
             + dims[None, :], out.to(o_ptr.dtype.element_ty), mask=(rows < n_keys)[:, None])


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get float32 products (not tf32): a float32 model should not lose digits
    here; half-precision inputs are exact in either mode."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _blocks(head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): on an H100 at head_dim 128 (64, 64, 4, 3) was the
    fastest or within noise of it at every N and density of benchmarks/attention_kernels.py --tune;
    small blocks on the CPU interpreter, where block size is only cost."""
    if device.type != "cuda":
        return 16, 16, 1, 1
    return 64, 64, 4, 3


def sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   windows: torch.Tensor, causal: bool = True, scale: float | None = None,
                   blocks: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """q [B, Hq, M, D], k/v [B, Hkv, N, D] (M <= N; queries are the last M positions),
    sinks/windows int32 [Hkv] on q's device -> [B, Hq, M, D]. The last dim must be contiguous."""
    b, hq, m, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if hq % hkv or d not in (16, 32, 64, 128, 256) or m > n:
        raise ValueError(f"sparse_prefill: unsupported shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    block_m, block_n, warps, stages = blocks or _blocks(d, q.device)
    scale = d ** -0.5 if scale is None else scale
    grid = (triton.cdiv(m, block_m), b * hq)
    _sparse_prefill_kernel[grid](
        q, k, v, out, sinks, windows,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, hq // hkv, m, n, scale * LOG2E,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, PRECISION=dot_precision(q.dtype),
        DENSE=DENSE_WINDOW, num_warps=warps, num_stages=stages)
    return out
