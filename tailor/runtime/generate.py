"""Generation with the rewritten model over a per-head KV cache (tailor.runtime.kv_cache).

The transformers model runs as it is (its embeddings, norms, rotary encoding, MLPs); only its
attention is routed through tailor's ops (tailor.codegen.triton.ops: Triton kernels on CUDA,
the torch references elsewhere) while a `DecodeState` is active:
- prefill, prompts of one length together: block-sparse attention over the prompt with each KV
  head's pattern at the prompt's length, and each head's kept positions written into its cache;
- decode, the whole batch at once: the new token's K/V written into each head's ring, attention
  over the kept positions of each sequence at its own length.
A layer that reads another layer's KV (kv_share) uses that layer's cache and writes nothing.
Pruned heads and skipped layers need nothing here: the model no longer has them.
"""
from __future__ import annotations

import array
import warnings
from dataclasses import dataclass, field

import torch

from tailor.codegen.triton import ops
from tailor.codegen.triton.reference import DENSE_WINDOW
from tailor.core.errors import TailorError
from tailor.core.patterns import Pattern
from tailor.rewriter.modules.decoding import ACTIVE
from tailor.rewriter.modules.shared_kv import SharedKVAttention
from tailor.rewriter.modules.sparse_attention import RUNTIME_IMPLEMENTATION, dispatching_module, register
from tailor.runtime.kv_cache import HeadLayout, LayerCache, prompt_indices, write_prompt_rows


@dataclass(eq=False)
class PrefillStep:
    """One attention module's part of prefilling one sequence: where the prompt's K/V go in its
    cache (None: it reads another layer's, writing nothing) and its heads' spans at the prompt's
    length, as device tensors made before the model runs. While Generator.prefill runs the model,
    each attention module that transformers' interface dispatches holds its step as
    `module.tailor_prefill` (sparse_attention_forward calls it): under torch.compile the prefill's
    attention is then traced into the model's graph (the cache writes as they are, the kernel as a
    custom op), and the whole forward compiles as one graph, where a call out to the runtime's
    state (what decoding does) splits it at every layer (measured on an H100 machine: SmolLM2-135M's
    16K prefill then took ~30 ms of host work for 12 ms of kernels)."""
    cache: LayerCache | None
    slots: torch.Tensor
    rows: torch.Tensor
    every: bool
    first: int                  # the cache row of the first of the prompts (eagerly)
    batch_rows: torch.Tensor    # the prompts' cache rows on the device (under torch.compile)
    sinks: torch.Tensor
    windows: torch.Tensor

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 causal: bool = True) -> torch.Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] (rotary applied) -> [B, T, Hq, D]."""
        if self.cache is not None:
            c = self.cache
            # self.first is not read under torch.compile: its guard would recompile the model per row
            batch_rows = self.batch_rows if torch.compiler.is_compiling() else self.first
            write_prompt_rows(c.k, c.v, k, v, self.slots, self.rows, batch_rows, self.every)
        # eagerly without the custom op's dispatch (~40 µs a call)
        attend = ops.sparse_prefill if torch.compiler.is_compiling() else ops.sparse_prefill_direct
        return attend(q, k, v, self.sinks, self.windows, causal, scale).transpose(1, 2)


@dataclass
class DecodeState:
    caches: dict[int, LayerCache]           # id(attention module) -> its cache (shared ones alias)
    writers: set[int]                       # modules that own (write) their cache
    patterns: dict[int, list]               # id(module) -> per-KV-head Pattern | None
    lengths: torch.Tensor                   # [B] int32: tokens so far, the current one included
    phase: str = "prefill"
    first: int = 0                          # the cache row of the first prompt being prefilled
    _spans: dict = field(default_factory=dict)
    _steps: dict = field(default_factory=dict)

    def prefill_spans(self, key: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if (key, n) not in self._spans:
            pats = self.patterns[key]
            sinks = [0 if p is None or p.is_dense_at(n) else p.sink for p in pats]
            windows = [DENSE_WINDOW if p is None or p.is_dense_at(n) else p.window(n) for p in pats]
            self._spans[(key, n)] = (torch.tensor(sinks, dtype=torch.int32, device=device),
                                     torch.tensor(windows, dtype=torch.int32, device=device))
        return self._spans[(key, n)]

    def prefill_step(self, key: int, n: int, count: int, device) -> PrefillStep:
        """Module `key`'s step for `count` prompts of n tokens from row self.first (the same object
        each time: torch.compile's guards then hold from one prefill to the next)."""
        at = (key, n, self.first, count)
        if at not in self._steps:
            cache = self.caches[key]
            slots, rows, every = prompt_indices(cache.layout, n, str(device))
            writes = cache if key in self.writers else None
            sinks, windows = self.prefill_spans(key, n, device)
            batch_rows = torch.arange(self.first, self.first + count, device=device)
            self._steps[at] = PrefillStep(writes, slots, rows, every, self.first, batch_rows, sinks, windows)
        return self._steps[at]

    def attend(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               causal: bool = True) -> torch.Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] (rotary applied) -> [B, T, Hq, D]."""
        key = id(module)
        cache = self.caches[key]
        if self.phase == "prefill":
            return self.prefill_step(key, k.shape[2], k.shape[0], q.device)(q, k, v, scale, causal)
        if key in self.writers:
            cache.write_token(k[:, :, 0], v[:, :, 0], self.lengths)
        t = cache.t
        out = ops.sparse_decode(q[:, :, 0].contiguous(), cache.k, cache.v, self.lengths, t["offsets"],
                                t["sinks"], t["rings"], t["alphas"], t["betas"], scale, cache.longest,
                                cache.busy_heads)
        return out[:, None]


def _attention_modules(model) -> list[tuple[torch.nn.Module, torch.nn.Module | None]]:
    """(attention module, source k projection if it reads another layer's KV), in model order."""
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, SharedKVAttention):
            out.append((m, m._source[0]))
            seen.update(id(x) for x in m.modules())
        elif id(m) not in seen and hasattr(m, "k_proj") and dispatching_module(m) is m:
            out.append((m, None))
    return out


def new_state(model, batch: int, max_len: int, lengths: torch.Tensor) -> DecodeState:
    """Caches for every attention layer of `model`, sized by its patterns for max_len tokens."""
    modules = _attention_modules(model)
    if not modules:
        raise TailorError(f"{type(model).__name__}: no attention modules that tailor's runtime can drive "
                          "(it runs Llama-style decoders: q/k/v/o projections through transformers' "
                          "attention interface)")
    param = next(model.parameters())
    caches, writers, patterns, by_kproj = {}, set(), {}, {}
    for m, source in modules:
        if source is not None:
            continue
        head_dim = m.head_dim
        kv_heads = m.k_proj.out_features // head_dim
        spans = getattr(m, "tailor_spans", None) or [None] * kv_heads
        pats = [Pattern.from_json(s) for s in spans]
        cache = LayerCache(HeadLayout.for_patterns(pats, max_len), batch, head_dim, param.dtype, param.device)
        caches[id(m)], patterns[id(m)], by_kproj[id(m.k_proj)] = cache, pats, id(m)
        writers.add(id(m))
    for m, source in modules:
        if source is not None:
            owner = by_kproj[id(source)]
            caches[id(m)], patterns[id(m)] = caches[owner], [None] * len(patterns[owner])
    return DecodeState(caches, writers, patterns, lengths)


def kv_cache_bytes(state: DecodeState) -> int:
    return sum(state.caches[k].nbytes for k in state.writers)


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int,
          generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


# tokens one prefill forward takes at most (prompts of one length are batched up to it): a 1B
# model's FFN activations for 64K tokens are ~1 GiB in bf16
PREFILL_TOKENS = 65536


def equal_length_runs(prompts: list[list[int]], max_tokens: int) -> list[tuple[int, int]]:
    """(first, count) of runs of consecutive prompts of one length, each at most max_tokens
    tokens (one prompt at least)."""
    runs: list[tuple[int, int]] = []
    for b, p in enumerate(prompts):
        if runs and len(prompts[runs[-1][0]]) == len(p) and (runs[-1][1] + 1) * len(p) <= max_tokens:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


class Generator:
    """Prefill prompts, then decode the batch one token at a time, over the per-head KV cache.
    `cuda_graph=True` (CUDA only) captures one decode step and replays it: the step's shapes are
    static (one token per sequence, caches preallocated), so only the kernels' time remains.
    `compiled=True` runs the model (prefill and decode) through torch.compile, which fuses its
    small elementwise kernels (norms, rotary, activations, casts): at a 32K context they were
    most of a decode step of a ~1B model. tailor's attention ops run between the compiled parts."""

    def __init__(self, model, batch: int, max_len: int, *, cuda_graph: bool = False,
                 compiled: bool = False):
        self.model = getattr(model, "inner", model)
        self.device = next(self.model.parameters()).device
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.state = new_state(self.model, batch, max_len, self.lengths)
        # the modules whose attention goes through sparse_attention_forward (not SharedKVAttention)
        self._dispatched = [m for m, source in _attention_modules(self.model) if source is None]
        self.max_len = max_len
        self._longest = 0  # the longest sequence, kept on the host: no device sync per step
        register()
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self._graph = None
        self._tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._logits: torch.Tensor | None = None
        self._forward = self.model
        if compiled and any(source is not None for _, source in _attention_modules(self.model)):
            # kv_share layers read K/V left by forward hooks on another layer's projections, and
            # under torch.compile those hooks did not run (the layer read a stale K/V)
            warnings.warn("compiled generation does not cover KV-sharing layers yet; running eagerly",
                          stacklevel=2)
        elif compiled:  # attention itself runs outside the graphs (sparse_attention._attend_generating)
            self._forward = torch.compile(self.model)

    def _run(self, **inputs) -> torch.Tensor:
        saved = self.model.config._attn_implementation
        self.model.config._attn_implementation = RUNTIME_IMPLEMENTATION
        token = ACTIVE.set(self.state)
        try:
            return self._forward(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        finally:
            ACTIVE.reset(token)
            self.model.config._attn_implementation = saved

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Each prompt into its row of the cache; logits [B, V] of each prompt's last token.
        Consecutive prompts of one length go through the model together, up to PREFILL_TOKENS
        tokens a forward (what bounds the activations' memory)."""
        if (len(prompts) != self.lengths.shape[0] or max(len(p) for p in prompts) >= self.max_len
                or min(len(p) for p in prompts) == 0):
            raise TailorError(f"prefill: {len(prompts)} prompts for a batch of {self.lengths.shape[0]} "
                              f"rows, each non-empty and shorter than {self.max_len} tokens")
        out = []
        self.state.phase = "prefill"
        for first, count in equal_length_runs(prompts, PREFILL_TOKENS):
            n = len(prompts[first])
            self.state.first = first
            ids = self._ids(prompts[first:first + count])
            positions = torch.arange(n, device=self.device)[None]
            for m in self._dispatched:
                m.tailor_prefill = self.state.prefill_step(id(m), n, count, self.device)
            try:
                out.append(self._run(input_ids=ids, position_ids=positions))
            finally:
                for m in self._dispatched:
                    del m.tailor_prefill
            self.lengths[first:first + count].fill_(n)  # `lengths[b] = n` waits for the GPU to finish
        self._longest = max(len(p) for p in prompts)
        self.state.phase = "decode"
        return torch.cat(out)

    def _ids(self, prompts: list[list[int]]) -> torch.Tensor:
        """[B, N] token ids of prompts of one length on the device, copied from pinned host memory
        without waiting: a plain torch.tensor(prompts, device=...) waits for all queued GPU work
        (and builds the tensor from lists several times slower than from an array)."""
        flat = array.array("q")
        for p in prompts:
            flat.extend(p)
        host = torch.frombuffer(flat, dtype=torch.long).view(len(prompts), -1)
        if self.device.type != "cuda":
            return host.clone().to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _decode(self) -> torch.Tensor:
        return self._run(input_ids=self._tokens, position_ids=(self.lengths - 1).long()[:, None])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens [B] (one per sequence); logits [B, V] for the next position."""
        if self._longest >= self.max_len:
            raise TailorError(f"the cache holds {self.max_len} tokens per sequence; it is full")
        self._tokens.copy_(tokens.view(-1, 1))
        self.lengths += 1
        self._longest += 1
        if not self.cuda_graph:
            return self._decode()
        if self._graph is None:
            # warm up on a side stream (kernels compiled, allocator primed), then capture; the
            # warm-up writes the same K/V into the same slots the replay will, so it is harmless
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._decode()
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._logits = self._decode()
        self._graph.replay()
        return self._logits


@torch.no_grad()
def generate(model, prompts: list[list[int]] | torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0, eos_token_id: int | None = None,
             return_state: bool = False, compiled: bool = False, cuda_graph: bool = False):
    """Continue each prompt by up to max_new_tokens tokens (greedy, or sampled with temperature and
    top-k); returns the new tokens per prompt (and the DecodeState if return_state). compiled:
    run the model through torch.compile; cuda_graph: replay one captured decode step (see
    Generator)."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not prompts or any(len(p) == 0 for p in prompts) or max_new_tokens < 1:
        raise TailorError("generate: give non-empty prompts and max_new_tokens >= 1")
    gen = Generator(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens, compiled=compiled,
                    cuda_graph=cuda_graph)
    generator = torch.Generator(device=gen.device).manual_seed(seed) if do_sample else None
    nxt = _pick(gen.prefill(prompts), do_sample, temperature, top_k, generator)
    generated = [nxt]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=gen.device)
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None:
            done |= nxt == eos_token_id
            if bool(done.all()):
                break
        nxt = _pick(gen.step(nxt), do_sample, temperature, top_k, generator)
        generated.append(nxt)
    tokens = torch.stack(generated, 1).tolist()
    if eos_token_id is not None:
        tokens = [t[:t.index(eos_token_id) + 1] if eos_token_id in t else t for t in tokens]
    return (tokens, gen.state) if return_state else tokens
