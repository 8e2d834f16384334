"""A KV cache sized per KV head by the plan (MoA's static circular cache).

Each KV head of a layer keeps its sink (the first `sink` positions) plus a ring buffer of the last
`ring` positions, ring = its largest window at the longest length the cache serves; a dense head
keeps every position (sink 0, ring = max_len). A layer's heads live side by side in one flat
tensor [B, slots, D] (head h at rows offset[h] .. offset[h] + sink[h] + ring[h]), so the cache's
memory is the plan's kept spans, not heads × max_len. Position p of head h sits in slot
    offset[h] + p                               if p < sink[h]
    offset[h] + sink[h] + (p - sink[h]) % ring  otherwise.
At length n (the query is position n - 1) head h attends positions p < sink and
n - window(n) <= p <= n - 1 (tailor.core.patterns). With a window that grows with
the length (beta > 0), positions cached at an earlier step were computed under that step's
window, as in MoA; with static windows cached decoding equals recomputing the whole sequence.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tailor.codegen.triton.reference import DENSE_WINDOW
from tailor.core.patterns import Pattern


@dataclass(frozen=True)
class HeadLayout:
    sinks: tuple[int, ...]
    rings: tuple[int, ...]
    alphas: tuple[float, ...]   # window(n) = floor(alpha + beta * n); dense: alpha = DENSE_WINDOW
    betas: tuple[float, ...]

    @classmethod
    def for_patterns(cls, patterns: list["Pattern | None"], max_len: int) -> "HeadLayout":
        sinks, rings, alphas, betas = [], [], [], []
        for p in patterns:
            if p is None or p.is_dense_at(max_len):
                sinks.append(0), rings.append(max_len), alphas.append(float(DENSE_WINDOW)), betas.append(0.0)
                continue
            sink = min(p.sink, max_len)
            widest = max(p.window(n) for n in (1, max_len))  # monotone in n: one end is the widest
            sinks.append(sink), rings.append(max(1, min(max_len - sink, widest)))
            alphas.append(float(p.alpha)), betas.append(float(p.beta))
        return cls(tuple(sinks), tuple(rings), tuple(alphas), tuple(betas))

    @property
    def kv_heads(self) -> int:
        return len(self.sinks)

    @functools.cached_property
    def offsets(self) -> list[int]:
        out, at = [], 0
        for s, r in zip(self.sinks, self.rings):
            out.append(at)
            at += s + r
        return out

    @property
    def slots(self) -> int:
        return sum(self.sinks) + sum(self.rings)

    def window(self, h: int, n: int) -> int:
        return min(DENSE_WINDOW, int(math.floor(self.alphas[h] + self.betas[h] * n)))

    def slot(self, h: int, p: int) -> int:
        s = self.sinks[h]
        return self.offsets[h] + (p if p < s else s + (p - s) % self.rings[h])

    def kept_positions(self, h: int, n: int) -> list[int]:
        s = self.sinks[h]
        return list(range(min(s, n))) + list(range(max(s, n - self.window(h, n)), n))

    def kept_slots(self, h: int, n: int) -> list[int]:
        return [self.slot(h, p) for p in self.kept_positions(h, n)]

    def tensors(self, device) -> dict[str, torch.Tensor]:
        """What the decode kernel reads: int32 offsets/sinks/rings, float64 alphas/betas."""
        i32 = dict(dtype=torch.int32, device=device)
        return {"offsets": torch.tensor(self.offsets, **i32), "sinks": torch.tensor(self.sinks, **i32),
                "rings": torch.tensor(self.rings, **i32),
                "alphas": torch.tensor(self.alphas, dtype=torch.float64, device=device),
                "betas": torch.tensor(self.betas, dtype=torch.float64, device=device)}


def slots_of(t: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """Slots of positions [..., kv_heads] (int64), per the layout's rule."""
    s, r = t["sinks"].long(), t["rings"].long()
    p = positions.long()
    return t["offsets"].long() + torch.where(p < s, p, s + torch.remainder(p - s, r))


@functools.lru_cache(maxsize=64)
def prompt_indices(layout: HeadLayout, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Where a prompt of n tokens goes in a layer's cache: (slots [S], rows [S], every) with rows
    indexing the prompt's K/V as [N * kv_heads, D] (row p * kv_heads + h), each head's kept
    positions (its sink and the last `ring` positions) at their slots; every: the prompt fills
    every slot of the layer. Made on the host once per (layout, n) and kept on the device: the
    layers of a model mostly share one layout, and the prefill then waits on no host copy."""
    slots, rows = [], []
    for h, (s, r) in enumerate(zip(layout.sinks, layout.rings)):
        kept = torch.cat([torch.arange(min(s, n)), torch.arange(min(max(s, n - r), n), n)])
        slots.append(layout.offsets[h] + torch.where(kept < s, kept, s + torch.remainder(kept - s, r)))
        rows.append(kept * layout.kv_heads + h)
    dst, src = torch.cat(slots), torch.cat(rows)
    every = dst.numel() == layout.slots
    if every:  # each slot once, in slot order: the gather writes the whole cache row
        order = torch.argsort(dst)
        dst, src = dst[order], src[order]
        every = bool(torch.equal(dst, torch.arange(layout.slots)))
    return dst.to(device), src.to(device), every


def write_prompt_rows(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      slots: torch.Tensor, rows: torch.Tensor, batch_rows: int | torch.Tensor,
                      every: bool) -> None:
    """k/v [B, kv_heads, N, D] of B prompts of N tokens into B rows of a layer's caches
    [batch, slots, D], at the slots and from the rows of prompt_indices. The cache rows: eagerly
    from the int `batch_rows` on (the gather lands straight in the cache); under torch.compile a
    device tensor of the B row numbers, which the graph takes as an input (an int would be
    specialised: one graph per first row, a whole-model compile each). Plain torch ops, so
    torch.compile traces them into its graph (in-place writes into graph inputs)."""
    d = k.shape[-1]
    for cache, x in ((k_cache, k), (v_cache, v)):
        flat = x.transpose(1, 2).reshape(x.shape[0], -1, d)   # [B, N * kv_heads, D]
        if isinstance(batch_rows, int):
            into = cache[batch_rows:batch_rows + x.shape[0]]
            if every:
                torch.index_select(flat, 1, rows, out=into)
            else:
                into.index_copy_(1, slots, flat.index_select(1, rows))
        elif every:
            cache.index_copy_(0, batch_rows, flat.index_select(1, rows))
        else:
            cache.index_put_((batch_rows[:, None], slots[None]), flat.index_select(1, rows))


class LayerCache:
    """One layer's per-head cache for a batch: k/v [B, slots, D]; a KV-sharing layer reuses the
    LayerCache of the layer it reads (no memory of its own)."""

    def __init__(self, layout: HeadLayout, batch: int, head_dim: int, dtype, device):
        self.layout = layout
        self.t = layout.tensors(device)
        self.longest = max(s + r for s, r in zip(layout.sinks, layout.rings))  # most slots of a head
        # a step's work in units of the longest head (1 dense head + 7 short ones: 2, not 8), so
        # the split-K decode splits the long head over the whole GPU
        self.busy_heads = -(-sum(s + r for s, r in zip(layout.sinks, layout.rings)) // self.longest)
        self.k = torch.zeros(batch, layout.slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def write_prompt(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v [kv_heads, N, D] of one sequence's prompt: each head's kept positions go in, as one
        gather per tensor (index_select of the kept rows into the cache; index_copy_ where the
        prompt leaves slots unwritten) over slot/row indices made once per (layout, N)."""
        slots, rows, every = prompt_indices(self.layout, k.shape[1], str(k.device))
        write_prompt_rows(self.k, self.v, k[None], v[None], slots, rows, b, every)

    def write_token(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> None:
        """k/v [B, kv_heads, D] of the token at position lengths - 1 of each sequence."""
        slots = slots_of(self.t, (lengths - 1)[:, None].expand(-1, self.layout.kv_heads))
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, slots] = k
        self.v[rows, slots] = v

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
