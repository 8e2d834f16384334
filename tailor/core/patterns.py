"""Sparse attention patterns per KV head.

A pattern keeps, for a query at position i over N keys, the keys j with
    j < sink                    (attention sinks: the first tokens)
    or  i - window(N) < j       (a local window that grows with the length: MoA's elastic rule)
where window(N) = floor(alpha + beta * N); causality (or the bidirectional mask of an encoder)
comes on top, from the model's own mask. For an encoder the window is two-sided.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, order=True)
class Pattern:
    sink: int
    alpha: float
    beta: float

    def __post_init__(self):  # one spelling per pattern: plans and cache keys compare as JSON
        object.__setattr__(self, "sink", int(self.sink))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "beta", float(self.beta))

    def window(self, n: int) -> int:
        return int(math.floor(self.alpha + self.beta * n))

    def span(self, n: int) -> int:
        """Keys a query attends to at most, at N = n (also the KV-cache tokens a head keeps)."""
        return min(n, self.sink + self.window(n))

    def is_dense_at(self, n: int) -> bool:
        return self.sink + self.window(n) >= n

    def kept_keys_causal(self, n: int) -> float:
        """Σ over the n queries of the keys kept (causal): Σ_i min(i + 1, sink + window)."""
        s = min(n, self.sink + self.window(n))
        return s * (s + 1) / 2 + (n - s) * s

    def kept_keys_bidirectional(self, n: int) -> float:
        return n * min(n, self.sink + 2 * self.window(n) - 1)

    def to_json(self) -> list:
        return [self.sink, self.alpha, self.beta]

    @classmethod
    def from_json(cls, v) -> "Pattern | None":
        return None if v is None else cls(int(v[0]), float(v[1]), float(v[2]))

    @classmethod
    def checked(cls, v) -> "Pattern":
        """A pattern from an untrusted plan: [sink ≥ 0 (whole), alpha ≥ 1, beta ≥ 0], finite."""
        ok = isinstance(v, list) and len(v) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        if not ok or v[0] != int(v[0]) or v[0] < 0 or v[1] < 1 or v[2] < 0:
            raise ValueError(f"a pattern is [sink ≥ 0 (whole), alpha ≥ 1, beta ≥ 0], got {v!r}")
        return cls(int(v[0]), float(v[1]), float(v[2]))

    def __str__(self) -> str:
        beta = f" + {self.beta:g}·N" if self.beta else ""
        return f"sink {self.sink} + window {self.alpha:g}{beta}"


def density(patterns: list["Pattern | None"], n: int, causal: bool = True) -> float:
    """Fraction of the dense (causal or full) attention entries the heads keep at length n."""
    full = n * (n + 1) / 2 if causal else n * n
    kept = [full if p is None else
            min(full, p.kept_keys_causal(n) if causal else p.kept_keys_bidirectional(n)) for p in patterns]
    return sum(kept) / (full * len(kept))


def keep_mask(patterns: list["Pattern | None"], q_len: int, k_len: int, causal: bool,
              device=None) -> torch.Tensor:
    """[kv_heads, q_len, k_len] bool: True where the head attends (pattern only; the model's own
    causal/padding mask is combined by the caller). Queries are the last q_len positions."""
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    dist = i - j if causal else (i - j).abs()
    masks = []
    for p in patterns:
        if p is None:
            masks.append(torch.ones(q_len, k_len, dtype=torch.bool, device=device))
            continue
        # the window as a tensor of k_len keeps the sequence length symbolic under torch.export
        window = torch.floor(p.alpha + p.beta * torch.tensor(k_len, dtype=torch.float64, device=device))
        masks.append((j < p.sink) | (dist < window))
    return torch.stack(masks)

