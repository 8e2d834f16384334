"""The one cost model: FLOPs, bytes moved and KV-cache bytes of every component for a workload
on a target, turned into roofline latency. Every pass prices its options here.

Besides matrix products the model prices what grows with them but is not a product: the
elementwise passes around each branch (its norm and residual add, rotary embedding, the FFN's
activation) and, where attention is decomposed (MatMul, mask, Softmax, MatMul: how ONNX exports
of transformers run it), the full score matrix it materialises and passes over several times.
On refllama-16m's ONNX export under onnxruntime (1 × 512, profiled per op) products were 72% of
the time and the passes over materialised scores about 15%; a roofline of products alone
predicted 0.50 for a plan that measured 0.60.

A model's shape after rewriting is a `Structure`: per layer, whether it is kept, whether its FFN
is kept, which KV groups and how many query heads per group its attention keeps, each KV head's
attention pattern (attention work and KV cache ∝ the keys a head keeps), and which of its
branches' projections run on INT8 weights (priced at the target's measured INT8 rates); and
whether the LM head does. The cost of a structure is a sum over layers and the head, so an
option's cost is the difference between the structure with that one change and the dense one,
exactly, and a plan's cost is the dense cost plus the sum of its options' deltas (options of one
layer are combined by the search's constraints), plus, for an option that scales what other
options leave of a part (INT8 on a pruned FFN), the joint correction the search prices pair by
pair (tailor.passes.search).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import lsq_linear

from tailor.core.patterns import Pattern
from tailor.core.plan import OBJECTIVES
from tailor.core.targets import Target
from tailor.rewriter.graph import Attention, Projection, TransformerGraph
from tailor.rewriter.onnx_sparse_attention import blocked_keys


@dataclass(frozen=True)
class Workload:
    batch: int = 1
    prompt_len: int = 1024
    gen_len: int = 0          # generated tokens after the prompt (decode steps)
    # the prefill computes the head at each sequence's last position only, as generation serves
    # a model (transformers' logits_to_keep=1, vLLM, TGI); False: at every position (an ONNX
    # export's graph computes every position's logits)
    last_logits: bool = False

    @property
    def seq_len(self) -> int:  # tokens a prefill processes
        return self.prompt_len


@dataclass
class LayerShape:
    kept: bool = True
    ffn: bool = True
    kv_groups: int = 0               # KV heads kept
    queries_per_group: int = 0       # query heads kept per KV head
    own_kv: bool = True              # False when the layer reads another layer's KV cache
    ffn_width: int | None = None     # FFN channels kept (None: all)
    kv_patterns: tuple[Pattern | None, ...] | None = None   # per kept KV head (None: all dense)
    int8: tuple[str, ...] = ()       # branches ("attn", "ffn") whose projections run on INT8 weights


@dataclass
class HeadShape:
    """The LM head after the last block: the one option it has changes how it runs."""
    int8: tuple[str, ...] = ()       # ("lm_head",): on INT8 weights


@dataclass
class Structure:
    layers: list[LayerShape] = field(default_factory=list)
    head: HeadShape = field(default_factory=HeadShape)

    @classmethod
    def dense(cls, graph: TransformerGraph) -> "Structure":
        return cls([LayerShape(True, True, b.attn.num_kv_heads, b.attn.num_heads // b.attn.num_kv_heads)
                    for b in graph.blocks])

    def copy(self) -> "Structure":
        return Structure([replace(s) for s in self.layers], replace(self.head))

    def part(self, index: int) -> LayerShape | HeadShape:
        """Layer `index`'s shape; index = the number of layers: the head's (what an option's
        `layer` names, tailor.passes.base.Option)."""
        return self.layers[index] if index < len(self.layers) else self.head


@dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    kv_bytes: float = 0.0
    latency: float = 0.0
    attn_flops: float = 0.0

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.flops + o.flops, self.bytes + o.bytes, self.kv_bytes + o.kv_bytes,
                    self.latency + o.latency, self.attn_flops + o.attn_flops)

    def __sub__(self, o: "Cost") -> "Cost":
        return Cost(self.flops - o.flops, self.bytes - o.bytes, self.kv_bytes - o.kv_bytes,
                    self.latency - o.latency, self.attn_flops - o.attn_flops)

    def scaled(self, k: float) -> "Cost":
        """The same work at `k` times the modelled seconds."""
        return replace(self, latency=self.latency * k)

    def get(self, objective: str) -> float:
        return {"latency": self.latency, "flops": self.flops, "kv_memory": self.kv_bytes,
                "attention": self.attn_flops}[objective]


# Passes over the score matrix of decomposed attention besides the two products: masking
# (Where, read + write), Softmax (read + write) and the export's NaN guard (read).
SCORE_PASSES = 5
# Passes over [queries, head_dim] per head of a block-sparse ONNX core (onnx_sparse_attention)
# besides the products, the same for every pattern: q padded to whole blocks (read + write), kᵀ
# transposed to rows (2), the sink and window outputs added (3), sliced back (2); plus its own NaN
# guard (~3.5) where the input had none to move after the core (tailor.rewriter.cleanup), left
# to the fitted scale. A part of its own, not a share of the keys: on refllama-16m at 512 tokens
# the narrowest pattern (48 keys a query) cost 40% of the dense core (512 keys).
SPARSE_ROW_PASSES = 9
# Passes over [tokens, heads, head_dim] where a layer's heads run as two groups: q, k and v each
# gathered (read + write), the groups' outputs concatenated (2) and put back in head order (2)
GROUP_SPLIT_PASSES = 10
# The parts of the modelled latency a measured target's fit scales (CostModel.fit_to_measured):
# the passes around each branch (elementwise), the dense attention core, the block-sparse one
# of patterned heads: its products over the kept keys and its copies of rows (attention_core),
# and the products on INT8 weights
FITTED_PARTS = ("branch_passes", "attention_core", "sparse_keys", "sparse_rows", "int8_products")
# A fitted scale beyond this is a timing gone wrong
MAX_FITTED_SCALE = 100.0
# The least each part's scale may be fitted to. A roofline is a floor: 1. The table's INT8 rows
# are whole quantized products (the input's dynamic quantization included) timed alone, which
# inside a model may run faster as well as slower: a MiniLM plan with 11 of its 12 branches INT8
# (1 × 128) was priced 0.431 of the dense model from the table alone and measured 0.46-0.53 in
# four timings (2-core CPU, load 2-4)
MIN_FITTED_SCALE = dict.fromkeys(FITTED_PARTS, 1.0) | {"int8_products": 1 / MAX_FITTED_SCALE}
# Elementwise passes per token around a branch, in vectors of the hidden size: the norm (read +
# write) and the residual add (two reads, a write).
NORM_PASSES, ADD_PASSES = 2, 3
BRANCH_PASSES = NORM_PASSES + ADD_PASSES


class CostModel:
    def __init__(self, graph: TransformerGraph, workload: Workload, target: Target, *,
                 graph_kv_cache: bool = False):
        """`graph_kv_cache`: the model carries its own KV cache, which keeps every key whatever
        the heads' patterns (Backend.graph_kv_cache)."""
        self.graph, self.workload, self.target = graph, workload, target
        self.graph_kv_cache = graph_kv_cache
        # measured seconds per modelled second of each part a fit can see (fit_to_measured)
        self.scales = dict.fromkeys(FITTED_PARTS, 1.0)
        self.measured_ratios: dict[str, float] = {}
        self.fit_skipped: str | None = None
        self.fit_left_out: dict[str, str] = {}  # fit variants that could not be built: why
        # latency of the dense model the passes rewrite (an ONNX input after its lossless
        # clean-ups, tailor.rewriter.cleanup) / the input's as given: timed with the fit, 1 unmeasured
        self.baseline = 1.0

    def to_json(self) -> dict:
        out = {"target": self.target.name, "scales": dict(self.scales),
               "measured_ratios": self.measured_ratios, "baseline": self.baseline}
        out |= {"fit_left_out": self.fit_left_out} if self.fit_left_out else {}
        return out | ({"fit_skipped": self.fit_skipped} if self.fit_skipped else {})

    def fit_to_measured(self, measured: dict[str, tuple[Structure, float]]) -> dict[str, float]:
        """Scale the parts a roofline of products misprices (FITTED_PARTS) so that each variant
        (name → (structure, its latency / the dense model's, timed side by side on the target))
        costs what it measured: least squares over the variants, each scale in [MIN_FITTED_SCALE,
        MAX_FITTED_SCALE] (≥ 1 for a roofline's parts: one the model already prices as measured
        is kept). Returns the scales.

        What the products' roofline misses is mostly (1) work around each branch that head and
        FFN pruning do not shrink and a skipped branch removes: norms and residual adds
        (onnxruntime's fused SkipLayerNormalization alone was ~12% of MiniLM's 1 × 128 here),
        and (2) the attention core's many small per-head products and passes over the scores,
        which run far below the table's product rates: refllama-16m at 1 × 512 with half its
        query heads measured 0.67-0.69 of the dense model where a fit of (1) alone predicted
        0.78-0.80. A variant with half-width FFNs pins (1), one with half the heads (2), two with
        every head on a narrow and a wide pattern the block-sparse core's row copies and keys, one
        with every branch INT8 (where the target prices INT8) the quantized products. Ratios
        timed side by side, not the dense model's absolute time: that mixed two moments of a noisy
        machine (MiniLM timed 12.2, 14.7 and 18.8 ms in three compiles)."""
        self.scales = dict.fromkeys(FITTED_PARTS, 1.0)
        self.measured_ratios = {name: ratio for name, (_, ratio) in measured.items()}
        if not measured:
            return self.scales
        dense = self.parts(Structure.dense(self.graph))
        # per variant: rest_v + Σ k·part_v = ratio · (rest_d + Σ k·part_d), linear in the scales k
        rows, rhs = [], []
        for structure, ratio in measured.values():
            v = self.parts(structure)
            rows.append([v[c] - ratio * dense[c] for c in FITTED_PARTS])
            rhs.append(ratio * dense["rest"] - v["rest"])
        a = np.array(rows) / dense["rest"]  # seconds → fractions of the unscaled remainder
        b = np.array(rhs) / dense["rest"]
        used = np.abs(a).max(axis=0) > 1e-12  # a part no structure has (a torch graph's sparse core) keeps 1
        if used.any():
            low = [MIN_FITTED_SCALE[c] for c, u in zip(FITTED_PARTS, used) if u]
            fit = lsq_linear(a[:, used], b, bounds=(low, MAX_FITTED_SCALE))
            for c, k in zip([c for c, u in zip(FITTED_PARTS, used) if u], fit.x):
                self.scales[c] = float(k)
        return self.scales

    def parts(self, structure: Structure) -> dict[str, float]:
        """Modelled latency of `structure` split into FITTED_PARTS (unscaled) and the rest."""
        kept, out = dict(self.scales), {}
        try:
            self.scales = dict.fromkeys(FITTED_PARTS, 0.0)
            out["rest"] = self.total(structure).latency
            for c in FITTED_PARTS:
                self.scales[c] = 1.0
                out[c] = self.total(structure).latency - out["rest"]
                self.scales[c] = 0.0
        finally:
            self.scales = kept
        return out

    @property
    def prices_int8(self) -> bool:
        """Whether the target has a measured INT8 figure (else INT8 is not offered)."""
        return bool(self.target.int8_rates)

    # -- pieces ------------------------------------------------------------------------------
    def _matmul(self, tokens: int, n_in: int, n_out: int, weight_reads: int, int8: bool = False) -> Cost:
        """tokens × (n_in -> n_out) with the weight read `weight_reads` times (once per step); on
        INT8 weights, a byte each, the input also written and read once quantized."""
        e = self.target.bytes_per_element
        flops = 2.0 * tokens * n_in * n_out
        if int8:
            by = weight_reads * n_in * n_out + tokens * (n_in + n_out) * e + 2 * tokens * n_in
            return self._roofline(flops, by, calls=weight_reads, seconds=self.target.int8_compute_seconds)
        by = weight_reads * n_in * n_out * e + tokens * (n_in + n_out) * e
        return self._roofline(flops, by, calls=weight_reads)

    def _roofline(self, flops: float, by: float, calls: int = 1, seconds=None) -> Cost:
        """`flops` done in `calls` equal products (a measured target's rate depends on their size),
        timed by `seconds` (default: the target's float products)."""
        seconds = seconds or self.target.compute_seconds
        t = max(calls * seconds(flops / calls), by / self.target.bytes_per_s)
        return Cost(flops, by, 0.0, t)

    def _phases(self, head: bool = False):
        """(tokens processed, matmul passes over the weights, mean keys per query) per phase; for
        the `head`, the prefill's tokens are those whose logits it keeps."""
        w = self.workload
        yield w.batch * (1 if head and w.last_logits else w.prompt_len), 1, None
        for step in range(w.gen_len) if w.gen_len <= 64 else []:
            yield w.batch, 1, w.prompt_len + step + 1
        if w.gen_len > 64:  # decode steps differ only in context length: one pass at the mean
            yield w.batch * w.gen_len, w.gen_len, w.prompt_len + (w.gen_len + 1) / 2

    def projections(self, projs: list[tuple[int, int]], int8: bool = False, head: bool = False) -> Cost:
        total = Cost()
        for tokens, reads, _ in self._phases(head):
            for n_in, n_out in projs:
                total = total + self._matmul(tokens, n_in, n_out, reads, int8)
        return total.scaled(self.scales["int8_products"]) if int8 else total

    def attention_core(self, a: Attention, queries_per_group: int, patterns: list[Pattern | None],
                       own_kv: bool) -> Cost:
        """The attention core of KV heads with `patterns` (None: dense), each part at its fitted
        scale: the dense heads; and the block-sparse ones (an ONNX graph's patterned heads:
        onnx_sparse_attention) as their products over the kept keys and the copies of their rows,
        which run at other rates than the dense core's products and cost the same whatever
        the pattern."""
        blocked = a.kind == "decomposed" and self.graph.backend == "onnx"
        dense = [p for p in patterns if p is None or not blocked]
        sparse = [p for p in patterns if p is not None and blocked]
        total = Cost()
        if dense:
            core, _ = self._core(a, queries_per_group, dense, own_kv)
            total = total + core.scaled(self.scales["attention_core"])
        if sparse:
            keys, rows = self._core(a, queries_per_group, sparse, own_kv)
            total = total + keys.scaled(self.scales["sparse_keys"]) + rows.scaled(self.scales["sparse_rows"])
        if blocked and len(set(patterns)) > 1:  # copies of rows like the block-sparse core's own
            split = self._group_split(a, queries_per_group * len(patterns))
            total = total + split.scaled(self.scales["sparse_rows"])
        return total

    def _group_split(self, a: Attention, heads: int) -> Cost:
        """A layer whose heads run as two groups (two patterns, or dense and one): q, k and v
        gathered per group, the outputs concatenated and put back in head order
        (onnx_sparse_attention.substitute), GROUP_SPLIT_PASSES over [tokens, heads, head_dim], at
        the fitted rate of the block-sparse core's own copies of rows. The fit's variants put every
        head on one pattern and never see it: on refllama-16m at 512 tokens a plan's six split
        layers measured 1.014 of the dense model where 0.96 was predicted without this term (1.04
        with it; 0.974 with it at the roofline's rate)."""
        tokens = self.workload.batch * self.workload.prompt_len
        return self._roofline(0.0, tokens * heads * a.head_dim * self.target.bytes_per_element *
                              GROUP_SPLIT_PASSES)

    def _core(self, a: Attention, queries_per_group: int, patterns: list[Pattern | None],
              own_kv: bool) -> tuple[Cost, Cost]:
        """(the core, the block-sparse copies of its patterned heads' rows). The core: q·kᵀ and
        p·v, plus reading (decode) and writing (prefill) the KV cache; each KV head (with its
        query heads) over the keys its pattern keeps (all of them, and the passes over the
        scores, where attention is decomposed: patterns are masks there and save nothing; an
        ONNX graph's are block-sparse ops, whole key blocks)."""
        w, e, d = self.workload, self.target.bytes_per_element, a.head_dim
        n, kv_heads = w.prompt_len, len(patterns)
        heads = kv_heads * queries_per_group
        decomposed = a.kind == "decomposed"
        # an ONNX graph's decomposed core is rewritten block-sparse (onnx_sparse_attention):
        # whole key blocks, masked entries included; a torch model's is masked, saving nothing
        blocked = decomposed and self.graph.backend == "onnx"
        # a torch model's patterned heads run as masked dense attention (every key, and the mask
        # rules out the causal kernel's skipped half) unless the target runs tailor's
        # block-sparse prefill; its per-head KV cache shrinks on any device
        masked = not decomposed and not self.target.sparse_prefill and any(p is not None for p in patterns)
        total, rows = Cost(), Cost()
        for tokens, steps, keys in self._phases():
            if keys is None:  # prefill: keys per query summed over the KV heads
                if blocked:
                    kept = [float(n) if p is None else float(blocked_keys(p, n, a.causal))
                            for p in patterns]
                elif decomposed or masked:  # the whole score matrix is computed, then masked
                    kept = [float(n)] * kv_heads
                elif a.causal:
                    kept = [(n + 1) / 2 if p is None else p.kept_keys_causal(n) / n for p in patterns]
                else:
                    kept = [n if p is None else min(n, p.kept_keys_bidirectional(n) / n) for p in patterns]
                # q and k, v read once, the output (and the KV cache) written
                by = tokens * (2 * heads * d * e + 2 * kv_heads * d * e * (2 if own_kv else 1))
                if blocked:  # the block-sparse ops' copies of q, k and the output, whatever the pattern
                    rows = rows + self._roofline(0.0, tokens * sum(p is not None for p in patterns) *
                                                 queries_per_group * d * e * SPARSE_ROW_PASSES)
            else:  # decode: every new token reads each head's cache (a patterned head its pattern's part)
                kept = [keys if p is None or (decomposed and not blocked) else
                        min(keys, blocked_keys(p, int(keys), a.causal) if blocked else p.span(int(keys)))
                        for p in patterns]
                by = tokens * sum(kept) * 2 * d * e
            flops = 4.0 * tokens * queries_per_group * sum(kept) * d
            step = self._roofline(flops, by, calls=steps)
            step.attn_flops = flops
            total = total + step
            if decomposed:  # separate ops after the product, each over all scores
                total = total + self._roofline(0.0, tokens * queries_per_group * sum(kept) * e * SCORE_PASSES)
        if own_kv and heads > 0:
            length = w.prompt_len + w.gen_len
            cached = sum(length if p is None or self.graph_kv_cache else p.span(length) for p in patterns)
            total.kv_bytes = w.batch * cached * 2 * d * e
        return total, rows

    # -- components of one layer ---------------------------------------------------------------
    def attention(self, layer: int, shape: LayerShape) -> Cost:
        a = self.graph.blocks[layer].attn
        heads = shape.kv_groups * shape.queries_per_group
        if not shape.kept or heads == 0:
            return Cost()
        d, hidden = a.head_dim, a.q.in_features
        kv_cols = shape.kv_groups * d if shape.own_kv else 0
        projs = [(hidden, heads * d), (heads * d, a.o.out_features)]
        projs += [(hidden, kv_cols), (hidden, kv_cols)] if kv_cols else []
        patterns = list(shape.kv_patterns or [None] * shape.kv_groups)
        return self.projections(projs, "attn" in shape.int8) + \
            self.attention_core(a, shape.queries_per_group, patterns, shape.own_kv)

    def ffn(self, layer: int, shape: LayerShape) -> Cost:
        if not shape.kept or not shape.ffn:
            return Cost()
        f = self.graph.blocks[layer].ffn
        width = f.width if shape.ffn_width is None else shape.ffn_width
        return self.projections([(p.in_features, width) if p is not f.down else (width, p.out_features)
                                 for p in f.projections], "ffn" in shape.int8)

    def elementwise(self, layer: int, shape: LayerShape) -> Cost:
        """The passes over activations around the products of the branches this layer keeps."""
        around, inside = self._elementwise_parts(layer, shape)
        return around.scaled(self.scales["branch_passes"]) + inside

    def _elementwise_parts(self, layer: int, shape: LayerShape) -> tuple[Cost, Cost]:
        """(around the kept branches, inside them), unscaled."""
        e, parts = self.target.bytes_per_element, [Cost(), Cost()]
        for tokens, _, _ in self._phases():
            for i, per_token in enumerate(self._passes(layer, shape)):
                parts[i] = parts[i] + self._roofline(0.0, tokens * per_token * e)
        return parts[0], parts[1]

    def _passes(self, layer: int, shape: LayerShape) -> tuple[float, float]:
        """Elements moved per token: (around each branch: its norm and residual add, vectors of
        the hidden size; inside the branches: rotary embedding, the FFN's activation)."""
        if not shape.kept:
            return 0.0, 0.0
        b = self.graph.blocks[layer]
        # a dropped branch becomes its mean output, still added to the stream (and, after a
        # post-norm block's add, still normed); a pre-norm branch's own norm goes with it
        dropped = (BRANCH_PASSES if b.residual == "post_norm" else ADD_PASSES) * b.attn.o.out_features
        branch = other = 0.0
        heads = shape.kv_groups * shape.queries_per_group
        if heads:
            branch += BRANCH_PASSES * b.attn.q.in_features
            if b.attn.rope:  # q and k rotated: read and written
                other += 2 * (heads + (shape.kv_groups if shape.own_kv else 0)) * b.attn.head_dim
        else:
            branch += dropped
        if shape.ffn:
            width = b.ffn.width if shape.ffn_width is None else shape.ffn_width
            act = 3 if b.ffn.gate is not None else 2  # the activation reads its input(s), writes
            branch += BRANCH_PASSES * b.ffn.down.out_features
            other += act * width
        else:
            branch += dropped
        return branch, other

    def layer(self, layer: int, shape: LayerShape) -> Cost:
        return self.attention(layer, shape) + self.ffn(layer, shape) + self.elementwise(layer, shape)

    def head(self, shape: HeadShape) -> Cost:
        """The LM head, over the positions whose logits the workload keeps (Workload.last_logits;
        the embedding is a lookup, not priced)."""
        head: Projection | None = self.graph.lm_head
        return self.projections([(head.in_features, head.out_features)], "lm_head" in shape.int8,
                                head=True) if head else Cost()

    def part(self, index: int, shape: LayerShape | HeadShape) -> Cost:
        """Layer `index`'s cost, or the head's (index = the number of layers: Structure.part)."""
        return self.layer(index, shape) if index < self.graph.num_layers else self.head(shape)

    def total(self, structure: Structure) -> Cost:
        total = self.head(structure.head)
        for i, shape in enumerate(structure.layers):
            total = total + self.layer(i, shape)
        return total

    def ratio(self, structure: Structure, objective: str) -> float:
        """`structure`'s cost / the input model's (for latency, through the baseline)."""
        return self.ratios(structure)[objective]

    def ratios(self, structure: Structure) -> dict[str, float]:
        dense, cur = self.total(Structure.dense(self.graph)), self.total(structure)
        out = {o: (cur.get(o) / dense.get(o) if dense.get(o) else 1.0) for o in OBJECTIVES}
        out["latency"] *= self.baseline
        return out


# ---- plain FLOP counts for `tailor inspect` ----------------------------------------------------

def projection_flops(p: Projection, tokens: int) -> int:
    return 2 * tokens * p.in_features * p.out_features


def attention_flops(a: Attention, w: Workload) -> int:
    tokens = w.batch * w.seq_len
    proj = sum(projection_flops(p, tokens) for p in a.projections)
    keys = (w.seq_len + 1) / 2 if a.causal else w.seq_len
    # scores (q @ k^T) and mixing (p @ v): each 2 * D FLOPs per query head, query and key
    core = 2 * 2 * w.batch * a.num_heads * w.seq_len * keys * a.head_dim
    return int(proj + core)


def ffn_flops(f, w: Workload) -> int:
    return sum(projection_flops(p, w.batch * w.seq_len) for p in f.projections)


def model_flops(g: TransformerGraph, w: Workload) -> int:
    return w.batch * forward_flops(g, w.seq_len)


def forward_flops(g: TransformerGraph, seq_len: int, first_layer: int = 0,
                  head_tokens: int | None = None) -> int:
    """One sequence of `seq_len` tokens through the blocks from `first_layer` on and the head (on
    `head_tokens` of them; all where None)."""
    w = Workload(1, seq_len)
    head = projection_flops(g.lm_head, seq_len if head_tokens is None else head_tokens) if g.lm_head else 0
    return sum(attention_flops(b.attn, w) + ffn_flops(b.ffn, w) for b in g.blocks[first_layer:]) + head


# ---- how much a compile measures -----------------------------------------------------------------

# FLOP/s a kind of device is taken to sustain in a compile's measuring forwards (SmolLM2-135M in
# float32 on 2 CPU cores: 1.4e11; on an H100 in bfloat16, a few 1e14). It turns an allowance of
# seconds into an amount of work, so that what gets measured follows from the model, the data and
# the kind of device, never from a timing: the same inputs give the same plan.
MEASURE_RATE = {"cpu": 1e11, "cuda": 1e14}


class Allowance:
    """Work (FLOPs) a stage may spend on measurements: `seconds` at the device kind's rate."""

    def __init__(self, seconds: float, device_kind: str):
        self.total = self.left = seconds * MEASURE_RATE.get(device_kind, MEASURE_RATE["cpu"])

    def affords(self, flops: float) -> bool:
        return flops <= self.left

    def spend(self, flops: float) -> None:
        self.left -= flops
