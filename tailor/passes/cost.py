"""What each part of a transformer costs: parameters and forward FLOPs for a workload.

This is the start of the single cost model every pass prices its options with. FLOPs count a
multiply-add as 2. Causal attention touches (T+1)/2 keys per query on average.
"""
from __future__ import annotations

from dataclasses import dataclass

from tailor.rewriter.graph import FFN, Attention, Block, Projection, TransformerGraph


@dataclass(frozen=True)
class Workload:
    batch: int = 1
    seq_len: int = 1024


def projection_flops(p: Projection, tokens: int) -> int:
    return 2 * tokens * p.in_features * p.out_features


def attention_flops(a: Attention, w: Workload) -> int:
    tokens = w.batch * w.seq_len
    proj = sum(projection_flops(p, tokens) for p in a.projections)
    keys = (w.seq_len + 1) / 2 if a.causal else w.seq_len
    # scores (q @ k^T) and mixing (p @ v): each 2 * D FLOPs per query head, query and key
    core = 2 * 2 * w.batch * a.num_heads * w.seq_len * keys * a.head_dim
    return int(proj + core)


def ffn_flops(f: FFN, w: Workload) -> int:
    return sum(projection_flops(p, w.batch * w.seq_len) for p in f.projections)


def block_flops(b: Block, w: Workload) -> int:
    return attention_flops(b.attn, w) + ffn_flops(b.ffn, w)


def model_flops(g: TransformerGraph, w: Workload) -> int:
    head = projection_flops(g.lm_head, w.batch * w.seq_len) if g.lm_head else 0
    return sum(block_flops(b, w) for b in g.blocks) + head
