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

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from tailor.backends.base import Backend, ProfileBatch
from tailor.core.patterns import Pattern
from tailor.data.retrieval import RetrievalSample
from tailor.rewriter.graph import TransformerGraph

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


def contains(outer: Pattern, inner: Pattern, n: int) -> bool:
    """Does `outer` keep every key `inner` keeps, at length n?"""
    return outer.sink >= inner.sink and outer.window(n) >= inner.window(n)


def _batches(texts: torch.Tensor | None, samples: list[RetrievalSample],
             retrieval_weight: float) -> list[ProfileBatch]:
    out = []
    if texts is not None and len(texts):
        out.append(ProfileBatch(texts, 1 - retrieval_weight if samples else 1.0, None))
    if samples:
        ids = torch.stack([s.ids for s in samples])  # make_samples: all of one length
        out.append(ProfileBatch(ids, retrieval_weight if out else 1.0, [s.answer_len for s in samples]))
    return out


def profile_attention(backend: Backend, texts: dict[int, torch.Tensor],
                      retrieval: dict[int, list[RetrievalSample]], grid: list[Pattern], *,
                      retrieval_weight: float, progress: bool) -> AttentionInfluence:
    """texts: length -> [n, length] token windows; retrieval: length -> samples of that length.
    Loss = (1 - w)·mean text KL + w·mean answer KL (w = retrieval_weight, when there are both)."""
    graph, runner = backend.graph, backend.pattern_runner()
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
