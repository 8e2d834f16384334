"""Attention-pattern profiling: what each (layer, KV head, pattern) really costs in quality.

Each candidate pattern is applied to one KV head and the divergence of the model's output from
the dense model's is measured on calibration sequences at each profiled length: next-token KL
on text windows and, weighted, the KL at the answer tokens of synthetic retrieval sequences —
what makes retrieval heads visible at all, since their work is a few tokens per sequence.

A transformers model runs the patterns through its attention interface; an ONNX model is
rewritten per measurement (tailor.rewriter.onnx_sparse_attention, one head's core) and run by
onnxruntime. Measured, not estimated: MoA's first-order estimate (attention matrix × its gradient, with the
softmax renormalisation written out) was tried here first and failed on a real model — for
refllama-16m's retrieval head it predicted -0.11 where masking really costs +0.99 (the answer
rows put ~all their mass on one far key, far outside a first-order regime). Two things keep the
measurements cheap:
- (transformers) the layers before the one being masked are frozen: their outputs are recorded
  once per sequence in a dense pass and replayed, so a measurement runs only the layers from there on;
- patterns are measured narrowest first, and once a pattern is (nearly) lossless for a head,
  every pattern containing it is assigned that loss without running.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from tqdm import tqdm

from tailor.backends.runners import as_runnable
from tailor.core.errors import TailorError
from tailor.core.patterns import Pattern
from tailor.data.retrieval import RetrievalSample
from tailor.rewriter import onnx_surgery
from tailor.rewriter.graph import TransformerGraph
from tailor.rewriter.modules.sparse_attention import IMPLEMENTATION, dispatching_module, register
from tailor.rewriter.onnx_sparse_attention import sparse_core, substitute
from tailor.rewriter.torch_surgery import attention_path, block_path

# a pattern this close to dense: every pattern containing it is given its loss (an upper bound)
LOSSLESS = 1e-3


@dataclass
class AttentionInfluence:
    lengths: list[int]
    grid: list[Pattern]
    loss: dict[int, np.ndarray]   # length -> [layers, kv_heads, patterns]: measured divergence
    measured: int                 # measurements run (the rest followed from containment)

    def to_json(self) -> dict:
        return {"lengths": self.lengths, "grid": [p.to_json() for p in self.grid], "measured": self.measured,
                "loss": {str(n): v.tolist() for n, v in self.loss.items()}}

    @classmethod
    def unmeasured(cls, graph: TransformerGraph, lengths: list[int],
                   grid: list[Pattern]) -> "AttentionInfluence":
        """Zero losses: enough to enumerate and price the options before any calibration."""
        shape = (graph.num_layers, graph.blocks[0].attn.num_kv_heads, len(grid))
        return cls(list(lengths), list(grid), {n: np.zeros(shape) for n in lengths}, 0)

    @classmethod
    def from_json(cls, d: dict) -> "AttentionInfluence":
        return cls([int(n) for n in d["lengths"]], [Pattern.from_json(p) for p in d["grid"]],
                   {int(n): np.asarray(v) for n, v in d["loss"].items()}, int(d["measured"]))


@dataclass
class _Batch:
    ids: torch.Tensor                    # [B, T], every row the same length
    weight: float                        # of this batch's mean divergence in the loss
    answer_lens: list[int] | None        # retrieval: answers are the last tokens of each row
    reference: torch.Tensor | None = None
    block_outputs: list | None = None

    @property
    def keep(self) -> int:
        """Logits needed: all for text, the answers' last few for retrieval (saves the head)."""
        return 0 if self.answer_lens is None else max(self.answer_lens) + 1


def contains(outer: Pattern, inner: Pattern, n: int) -> bool:
    """Does `outer` keep every key `inner` keeps, at length n?"""
    return outer.sink >= inner.sink and outer.window(n) >= inner.window(n)


def _run(model, batch: _Batch) -> torch.Tensor:
    kwargs = {"logits_to_keep": batch.keep} if batch.keep and _takes_logits_to_keep(type(model)) else {}
    with torch.no_grad():
        out = model(input_ids=batch.ids, use_cache=False, **kwargs)
    t = out.logits if getattr(out, "logits", None) is not None else out[0]
    return t.float()


@functools.cache
def _takes_logits_to_keep(model_class) -> bool:
    """Asked once per class: `_run` is the profile's inner loop."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def _record(model, blocks: list, batch: _Batch) -> None:
    outputs: list = [None] * len(blocks)
    hooks = [blk.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
             for i, blk in enumerate(blocks)]
    try:
        batch.reference = _run(model, batch)
    finally:
        for h in hooks:
            h.remove()
    batch.block_outputs = outputs


@contextlib.contextmanager
def _frozen_prefix(blocks: list, layer: int, outputs: list):
    """Blocks before `layer` return their recorded dense outputs instead of computing."""
    for i in range(layer):
        blocks[i].forward = lambda *a, _out=outputs[i], **k: _out
    try:
        yield
    finally:
        for i in range(layer):
            del blocks[i].forward


def _batch_divergence(ref: torch.Tensor, out: torch.Tensor, batch: _Batch, is_lm: bool) -> float:
    """Over every token for text, over each row's answer tokens for retrieval."""
    from tailor.passes.measure import divergence

    if batch.answer_lens is None:
        return divergence([ref], [out], is_lm)
    t = ref.shape[1]  # the positions that predict each row's answer tokens
    return float(np.mean([divergence([ref[r:r + 1, t - c - 1:t - 1]], [out[r:r + 1, t - c - 1:t - 1]], is_lm)
                          for r, c in enumerate(batch.answer_lens)]))


class _TorchRunner:
    """Patterns installed through transformers' attention interface; the layers before the one
    measured replay their recorded dense outputs."""

    def __init__(self, model, graph: TransformerGraph):
        self.model, self.is_lm = model, graph.task == "causal-lm"
        self.blocks = [model.get_submodule(block_path(model, b)) for b in graph.blocks]
        self.attns = [dispatching_module(model.get_submodule(attention_path(model, b))) for b in graph.blocks]

    @contextlib.contextmanager
    def active(self):
        register()
        saved = self.model.config._attn_implementation
        self.model.config._attn_implementation = IMPLEMENTATION
        try:
            yield
        finally:
            self.model.config._attn_implementation = saved

    def runs_patterns(self, layer: int) -> bool:
        return self.attns[layer] is not None

    def record(self, batch: _Batch) -> None:
        _record(self.model, self.blocks, batch)

    def loss(self, layer: int, patterns: list[Pattern | None], batches: list[_Batch]) -> float:
        self.attns[layer].tailor_spans = [None if p is None else p.to_json() for p in patterns]
        try:
            total = 0.0
            for b in batches:
                with _frozen_prefix(self.blocks, layer, b.block_outputs):
                    out = _run(self.model, b)
                total += b.weight * _batch_divergence(b.reference, out, b, self.is_lm)
            return total
        finally:
            self.attns[layer].tailor_spans = None


class _OnnxRunner:
    """An onnx_ir model: each measurement rewrites a copy (onnx_sparse_attention) and runs it
    whole with onnxruntime."""

    def __init__(self, model: ir.Model, graph: TransformerGraph):
        self.model, self.graph, self.is_lm = model, graph, graph.task == "causal-lm"
        self._dense = None  # one onnxruntime session of the dense model for every reference

    def active(self):
        return contextlib.nullcontext()

    def runs_patterns(self, layer: int) -> bool:
        try:
            sparse_core(self.model, self.graph.blocks[layer].attn)
        except TailorError:
            return False
        return True

    def record(self, batch: _Batch) -> None:
        if self._dense is None:
            self._dense = as_runnable(self.model)
        batch.reference = self._dense(batch.ids).float()

    def loss(self, layer: int, patterns: list[Pattern | None], batches: list[_Batch]) -> float:
        variant = onnx_surgery.clone(self.model)
        substitute(variant, self.graph.blocks[layer].attn, patterns)
        run = as_runnable(variant)
        return sum(b.weight * _batch_divergence(b.reference, run(b.ids).float(), b, self.is_lm)
                   for b in batches)


def _batches(texts: torch.Tensor | None, samples: list[RetrievalSample],
             retrieval_weight: float) -> list[_Batch]:
    out = []
    if texts is not None and len(texts):
        out.append(_Batch(texts, 1 - retrieval_weight if samples else 1.0, None))
    if samples:
        ids = torch.stack([s.ids for s in samples])  # make_samples: all of one length
        out.append(_Batch(ids, retrieval_weight if out else 1.0, [s.answer_len for s in samples]))
    return out


def profile_attention(model, graph: TransformerGraph, texts: dict[int, torch.Tensor],
                      retrieval: dict[int, list[RetrievalSample]], grid: list[Pattern], *,
                      retrieval_weight: float, progress: bool) -> AttentionInfluence:
    """texts: length -> [n, length] token windows; retrieval: length -> samples of that length.
    Loss = (1 - w)·mean text KL + w·mean answer KL (w = retrieval_weight, when there are both)."""
    runner = _OnnxRunner(model, graph) if isinstance(model, ir.Model) else _TorchRunner(model, graph)
    kv_heads = graph.blocks[0].attn.num_kv_heads
    lengths = sorted(set(texts) | set(retrieval))
    order = sorted(range(len(grid)), key=lambda k: (grid[k].sink + grid[k].alpha, grid[k].beta))
    losses, measured = {}, 0
    runs = [runner.runs_patterns(layer) for layer in range(graph.num_layers)]
    with runner.active():
        bar = tqdm(total=len(lengths) * graph.num_layers * kv_heads, desc="profiling attention heads",
                   disable=not progress, unit="head")
        for n in lengths:
            batches = _batches(texts.get(n), retrieval.get(n, []), retrieval_weight)
            for b in batches:
                runner.record(b)
            loss = np.full((graph.num_layers, kv_heads, len(grid)), np.nan)
            for layer in range(graph.num_layers):
                if not runs[layer]:
                    loss[layer] = np.inf  # no candidates here: masks would be ignored
                    bar.update(kv_heads)
                    continue
                for head in range(kv_heads):
                    for k in order:
                        p = grid[k]
                        if p.is_dense_at(n):
                            loss[layer, head, k] = 0.0
                            continue
                        done = [loss[layer, head, j] for j in order if loss[layer, head, j] <= LOSSLESS
                                and contains(p, grid[j], n)]  # NaN (not measured yet) compares False
                        if done:
                            loss[layer, head, k] = min(done)
                            continue
                        loss[layer, head, k] = runner.loss(
                            layer, [p if h == head else None for h in range(kv_heads)], batches)
                        measured += 1
                    bar.update()
            losses[n] = np.maximum(loss, 0.0)  # KL ≥ 0; clips float noise
        bar.close()
    return AttentionInfluence(lengths, grid, losses, measured)
