"""Sparse attention patterns per KV head, and the reference attention that runs them.

A pattern keeps, for a query at position i over N keys, the keys j with
    j < sink                    (attention sinks: the first tokens)
    or  i - window(N) < j       (a local window that grows with the length: MoA's elastic rule)
where window(N) = floor(alpha + beta * N); causality (or the bidirectional mask of an encoder)
comes on top, from the model's own mask. For an encoder the window is two-sided.

The rewritten model runs through `transformers`' attention interface: `install` registers the
implementation "tailor_sparse" and points a model's config at it; attention modules carry their
per-KV-head spans as `module.tailor_spans` (a list, one entry per KV head: [sink, alpha, beta] or
None for dense). This masked-SDPA path is the reference the Triton kernels must match; it traces
under torch.export with a dynamic sequence length, so the ONNX export runs the same pattern.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tailor.errors import TailorError

IMPLEMENTATION = "tailor_sparse"


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


def _base_mask(attention_mask, q_len: int, k_len: int, causal: bool, device) -> torch.Tensor | None:
    """The model's own mask as bool (True = attend), [B or 1, 1, q, k]; None when there is none."""
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2
    if not causal:
        return None
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return (torch.arange(k_len, device=device)[None, :] <= i)[None, None]


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention-interface function: masked SDPA with each KV head's own pattern.
    query [B, Hq, Q, D], key/value [B, Hkv, K, D]; returns ([B, Q, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    generated = _attend_generating(module, query, key, value, scaling, causal)
    if generated is not None:
        return generated, None
    spans = getattr(module, "tailor_spans", None)
    if not spans or all(s is None for s in spans):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    patterns = [Pattern.from_json(s) for s in spans]
    keep = keep_mask(patterns, q_len, k_len, causal, query.device).repeat_interleave(groups, 0)[None]
    base = _base_mask(attention_mask, q_len, k_len, causal, query.device)
    if base is not None:
        keep = keep & base
    key = key.repeat_interleave(groups, 1)
    value = value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=scaling,
                                         dropout_p=dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


@torch.compiler.disable
def _attend_generating(module, query, key, value, scaling, causal: bool) -> torch.Tensor | None:
    """Attention over tailor's per-head KV cache while tailor.runtime.generate drives the model,
    else None. Outside torch.compile: it reads the generation state from a ContextVar and looks
    the module up by identity, which dynamo would guard on, recompiling for every layer."""
    from tailor.runtime.generate import active_state

    state = active_state()
    if state is None or id(module) not in state.caches:
        return None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return state.attend(module, query, key, value, scale, causal)


def _dispatches(module) -> bool:
    import inspect

    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def dispatching_module(attention_module):
    """The module (this one or inside it, e.g. BERT's self-attention inside its attention block)
    that calls transformers' attention interface, so that a pattern installed on it is honoured;
    None for attention written by hand."""
    return next((m for m in attention_module.modules() if _dispatches(m)), None)


def runs_patterns(attention_module) -> bool:
    return dispatching_module(attention_module) is not None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, sparse_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def install(model, attention_module, patterns: list["Pattern | None"]) -> None:
    """Give one attention module its per-KV-head patterns and route the model through them."""
    target = dispatching_module(attention_module)
    if target is None:
        raise TailorError(f"{type(attention_module).__name__} computes attention itself; "
                          f"attention patterns need transformers' attention interface")
    register()
    target.tailor_spans = [None if p is None else p.to_json() for p in patterns]
    model.config._attn_implementation = IMPLEMENTATION
