"""Per-KV-head sparse attention in a transformers model, through its attention interface.

`install` registers the implementation "tailor_sparse" and points a model's config at it;
attention modules carry their per-KV-head spans as `module.tailor_spans` (a list, one entry per
KV head: [sink, alpha, beta] or None for dense). This masked-SDPA path is the reference the
Triton kernels must match; it traces under torch.export with a dynamic sequence length, so the
ONNX export runs the same pattern. While tailor's generation runtime drives the model
(tailor.rewriter.modules.decoding), attention goes to its per-head KV cache instead, under the
implementation "tailor_runtime": the same function with no mask function, so transformers builds
no attention mask for it (the runtime masks by its own lengths and patterns). A module's
`tailor_observer`, when set (the attention profile's dense recording pass), is shown the query, key
and value first; a module's `tailor_gates`, when set (while retrieval gates are fitted), mixes
dense and streaming attention per KV head; nothing sets either in an exported or rewritten model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tailor.core.errors import TailorError
from tailor.core.patterns import Pattern, keep_mask
from tailor.rewriter.modules.decoding import active_state

IMPLEMENTATION = "tailor_sparse"
# while tailor's runtime drives the model: no mask function registered, so transformers skips its
# mask (under torch.compile it would otherwise build a [Q, K] causal mask, 16K x 16K at a 16K
# prefill, that the runtime's kernels never read) and its packed-sequence check (a device sync)
RUNTIME_IMPLEMENTATION = "tailor_runtime"


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


# scores one masked SDPA call may hold (elements)
MASKED_SCORES = 2 ** 26


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers attention-interface function: masked SDPA with each KV head's own pattern.
    query [B, Hq, Q, D], key/value [B, Hkv, K, D]; returns ([B, Q, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    prefill = getattr(module, "tailor_prefill", None)
    if prefill is not None:  # tailor's runtime prefills a prompt (traced by torch.compile)
        return prefill(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5,
                       causal), None
    generated = _attend_generating(module, query, key, value, scaling, causal)
    if generated is not None:
        return generated, None
    observe = getattr(module, "tailor_observer", None)
    if observe is not None:  # set only while the attention profile records the dense model
        observe(query, key, value, attention_mask, scaling, causal)
    gates = getattr(module, "tailor_gates", None)
    if gates is not None:  # set only while retrieval gates are fitted (tailor.backends.retrieval_gates)
        alpha, pattern = gates
        dense, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                          is_causal=is_causal, **kwargs)
        if causal and query.shape[0] == 1 and query.shape[2] == key.shape[2]:  # one whole sequence
            streaming = attend_streaming(query, key, value, pattern, scaling)
        else:
            streaming = _attend(query, key, value, [pattern] * key.shape[1], attention_mask, causal, scaling,
                                0.0)
        groups = query.shape[1] // key.shape[1]
        a = alpha.to(dense.device, dense.dtype).repeat_interleave(groups)[:, None]  # per query head
        return a * dense + (1 - a) * streaming.transpose(1, 2), None
    spans = getattr(module, "tailor_spans", None)
    if not spans or all(s is None for s in spans):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    out = _attend(query, key, value, [Pattern.from_json(s) for s in spans], attention_mask, causal, scaling,
                  dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def _attend(query, key, value, patterns, attention_mask, causal: bool, scaling,
            dropout: float) -> torch.Tensor:
    """Each KV head on its own pattern (None: dense). [B, Hq, Q, D]."""
    # on the host the masked path computes every score and then drops most (12x the work of the
    # blocks at 4096 tokens); on a GPU it is a few large kernels where the blocks would be hundreds
    # of small launches a layer (not measured there: it stays as it was)
    if _traced(query) or dropout or query.device.type != "cpu":
        return _attend_masked(query, key, value, patterns, attention_mask, causal, scaling, dropout)
    groups = query.shape[1] // key.shape[1]
    return torch.cat([_attend_in_blocks(query[:, h * groups:(h + 1) * groups], key[:, h:h + 1],
                                        value[:, h:h + 1], p, attention_mask, causal, scaling)
                      for h, p in enumerate(patterns)], dim=1)


def _traced(query) -> bool:
    """Under torch.compile or torch.export (shapes may be symbolic, tensors fake)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.compiler.is_compiling() or exporting() or isinstance(query.shape[2], torch.SymInt)


def _attend_masked(query, key, value, patterns, attention_mask, causal: bool, scaling,
                   dropout: float) -> torch.Tensor:
    """Every head over every key, the patterns as a boolean mask: what torch.export traces (one
    graph for any length, so the ONNX export runs the same pattern), what training runs, and
    what runs on a GPU. [B, Hq, Q, D]."""
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    keep = keep_mask(patterns, q_len, k_len, causal, query.device).repeat_interleave(groups, 0)[None]
    base = _base_mask(attention_mask, q_len, k_len, causal, query.device)
    key = key.repeat_interleave(groups, 1)
    value = value.repeat_interleave(groups, 1)
    # a boolean mask sends SDPA down its math path, which holds every score: a few query rows at
    # a time (4 retrieval rows × 9 heads × 4096² scores took 2.4 GB of a 2-core CPU's memory);
    # in one piece while traced, where shapes are symbolic
    if _traced(query):
        starts, rows = [0], q_len
    else:
        rows = max(1, MASKED_SCORES // (query.shape[0] * query.shape[1] * k_len))
        starts = range(0, q_len, rows)
    out = []
    for s in starts:
        mask = keep[..., s:s + rows, :]
        mask = mask if base is None else mask & base[..., s:s + rows, :]
        out.append(F.scaled_dot_product_attention(query[:, :, s:s + rows], key, value, attn_mask=mask,
                                                  scale=scaling, dropout_p=dropout))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def attend_streaming(query, key, value, pattern: Pattern, scaling) -> torch.Tensor:
    """Causal attention of every head on one sink + window pattern, for one whole unpadded
    sequence (query and key of the same length, batch 1): [B, Hq, T, D]. The rows go in blocks of
    the window's size; block c attends to the sinks and to blocks c − 1 and c, all blocks in one
    batched product, so the scores are T·(sink + 2·window) rather than T², and the gradient (the
    retrieval gates' fit differentiates through it) keeps that much. Matches `_attend_masked`."""
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    size = max(1, min(pattern.window(t), t))
    sink = min(pattern.sink, t)
    blocks = -(-t // size)
    pad = blocks * size - t
    # keys: one block of zeros in front (block 0's "previous"), then the sequence padded to whole blocks
    padded = [F.pad(x, (0, 0, size, pad)) for x in (key, value)]
    band = [x.unfold(2, 2 * size, size).transpose(-1, -2) for x in padded]  # [B, Hkv, blocks, 2·size, D]
    sinks = [x[:, :, None, :sink].expand(-1, -1, blocks, -1, -1) for x in (key, value)]
    k, v = (torch.cat([s, w], dim=3) for s, w in zip(sinks, band))
    # which of those keys each row keeps: a sink at or before it; a band key inside the window,
    # past the sinks (counted once) and in the sequence
    pos = torch.arange(blocks * size, device=query.device).view(blocks, size, 1)
    sink_keys = torch.arange(sink, device=query.device)
    band_keys = (torch.arange(blocks, device=query.device).view(blocks, 1, 1) - 1) * size \
        + torch.arange(2 * size, device=query.device)
    dist = pos - band_keys
    in_window = (dist >= 0) & (dist < pattern.window(t))
    keep = torch.cat([sink_keys <= pos, in_window & (band_keys >= sink)], dim=-1)
    # one SDPA call, a (KV head, block) pair per batch entry: on a GPU its fused kernels keep no
    # scores for the backward pass
    q = F.pad(query, (0, 0, 0, pad)).view(b, kv_heads, groups, blocks, size, d).transpose(2, 3)
    q = q.reshape(b * kv_heads * blocks, groups, size, d)
    k, v = (x.reshape(b * kv_heads * blocks, 1, -1, d).expand(-1, groups, -1, -1) for x in (k, v))
    mask = keep[:, None].expand(b * kv_heads, -1, -1, -1, -1).reshape(b * kv_heads * blocks, 1, size, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    out = out.view(b, kv_heads, blocks, groups, size, d).transpose(2, 3)
    return out.reshape(b, heads, blocks * size, d)[:, :, :t]


# query rows of one block in `_attend_in_blocks`
BLOCK_ROWS = 256


def _attend_in_blocks(query, key, value, pattern: Pattern | None, attention_mask, causal: bool,
                      scaling) -> torch.Tensor:
    """The query heads of one KV head ([B, g, Q, D] over key/value [B, 1, K, D]), eagerly on the
    host: each block of query rows attends to the keys its pattern can keep (the sinks and the
    window's span), so a window of w keys costs Q·(sink + w) scores rather than Q·K, and no [Q, K]
    mask is built. A head without a pattern (or one dense at this length) goes to SDPA whole. The same
    kept keys as `_attend_masked`, so the same result up to summation order."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups, q_len = query.shape[1], query.shape[2]
    k_len = key.shape[2]
    key, value = key.expand(-1, groups, -1, -1), value.expand(-1, groups, -1, -1)
    if pattern is None or pattern.is_dense_at(k_len):
        if attention_mask is None and causal and q_len != k_len:  # queries are the last rows
            attention_mask = _base_mask(None, q_len, k_len, True, query.device)
        holder = torch.nn.Module()
        holder.is_causal = causal
        out, _ = sdpa_attention_forward(holder, query, key, value, attention_mask, scaling=scaling)
        return out.transpose(1, 2)
    base = None if attention_mask is None else _base_mask(attention_mask, q_len, k_len, causal, query.device)
    window, offset = pattern.window(k_len), k_len - q_len  # query row r is position offset + r
    reach = 1 if causal else window  # keys after the query that the pattern may keep
    out = []
    for s in range(0, q_len, BLOCK_ROWS):
        rows = min(q_len, s + BLOCK_ROWS) - s
        first, last = offset + s, offset + s + rows - 1
        lo, hi = max(0, first - window + 1), min(k_len, last + reach)
        if pattern.sink < lo:  # the sinks, then the window's span
            keys = torch.cat([torch.arange(pattern.sink, device=query.device),
                              torch.arange(lo, hi, device=query.device)])
        else:  # one range (an encoder's sinks may lie past the window)
            keys = torch.arange(min(k_len, max(hi, pattern.sink)), device=query.device)
        dist = torch.arange(first, last + 1, device=query.device)[:, None] - keys[None, :]
        keep = (keys[None, :] < pattern.sink) | ((dist if causal else dist.abs()) < window)
        if base is not None:
            keep = keep & base[..., s:s + rows, :].index_select(-1, keys)
        elif causal:
            keep = keep & (dist >= 0)
        out.append(F.scaled_dot_product_attention(query[:, :, s:s + rows],
                                                  key.index_select(2, keys), value.index_select(2, keys),
                                                  attn_mask=keep, scale=scaling))
    return torch.cat(out, dim=2)


@torch.compiler.disable
def _attend_generating(module, query, key, value, scaling, causal: bool) -> torch.Tensor | None:
    """Attention over tailor's per-head KV cache while tailor.runtime.generate drives the model,
    else None. Outside torch.compile: it reads the generation state from a ContextVar and looks
    the module up by identity, which dynamo would guard on, recompiling for every layer."""
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
    AttentionInterface.register(RUNTIME_IMPLEMENTATION, sparse_attention_forward)
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
