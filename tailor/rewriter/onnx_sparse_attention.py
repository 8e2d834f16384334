"""Sink + window attention as ONNX ops that compute only the kept blocks of the score matrix.

A mask on decomposed attention saves nothing: onnxruntime still computes every score. This
rewrite replaces a decomposed attention core (q @ kᵀ, scale, additive mask, softmax, @ v) by

    queries in blocks of `block` rows; block c attends to
      the sink keys [0, sink)                                   (one product for all queries)
      and the keys [c·block − reach, c·block + block (+ reach))  (gathered per block: window)

with reach = the window rounded up to whole blocks, the window computed from the sequence length
at run time (window(N) = floor(alpha + beta·N), as tailor.core.patterns defines it),
so the graph keeps its dynamic sequence length. Keys outside the pattern inside a gathered block,
padding past the end, and sink keys repeated in the window are masked; the model's own mask
(causal, padding) is gathered alongside. Both parts share one softmax. Heads of a layer with
different patterns (at most two, attn_pattern's rule) run as separate groups and are put back in
their order. Per query the products touch sink + reach + block keys (twice reach for an encoder's
two-sided window) instead of all of them: `blocked_keys` is what the cost model prices.

With a KV cache the queries are the last of the keys (a decode step: one query, the whole cache
as keys): blocks are laid over the queries at their positions, the window is the keys' length's,
so a step reads the sink and its window of the cache only and computes what the prefill of the
whole sequence computes for that position. The cache itself keeps every key (present = past +
this step's); what it holds is the runtime's, not the pattern's.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from tailor.core.errors import TailorError
from tailor.core.patterns import Pattern
from tailor.rewriter.graph import Attention

# score ops between q @ kᵀ and the softmax this rewrite reproduces: scalar scaling, additive mask
_SCALE_OPS = {"Mul", "Div"}
# the pattern's reference length for its block size: windows at this length set the block
BLOCK_REFERENCE_LEN = 1024


def block_size(p: Pattern) -> int:
    """Query rows per block: the window at BLOCK_REFERENCE_LEN rounded down to a power of two,
    16..64 (smaller blocks waste fewer keys, larger ones make fewer, larger products)."""
    w = max(1, p.window(BLOCK_REFERENCE_LEN))
    return int(min(64, max(16, 2 ** int(math.log2(w)))))


def blocked_keys(p: Pattern, n: int, causal: bool) -> int:
    """Keys a query's products touch at length n (masked ones included), at most n's padding."""
    b = block_size(p)
    reach = -(-(max(p.window(n), 1) - 1) // b) * b
    return min(p.sink, n) + reach * (1 if causal else 2) + b


class _Builder:
    """Nodes appended in order, inserted before the node the core ends in."""

    def __init__(self, prefix: str):
        self.nodes: list[ir.Node] = []
        self.prefix = prefix

    def op(self, op_type: str, *inputs, num_outputs: int = 1, **attrs):
        node = ir.node(op_type, list(inputs), attrs or None, num_outputs=num_outputs,
                       name=f"{self.prefix}/{op_type}_{len(self.nodes)}")
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else list(node.outputs)

    def const(self, value, dtype=np.int64):
        return self.op("Constant", value=ir.tensor(np.asarray(value, dtype=dtype)))

    def dim(self, shape_of, axis: int):
        """Dimension `axis` of a value's shape as a 1-element int64 tensor."""
        return self.op("Slice", self.op("Shape", shape_of), self.const([axis]), self.const([axis + 1]))


class _Core:
    """The pieces of one decomposed attention core, read from the graph."""

    def __init__(self, model: ir.Model, attn: Attention):
        if attn.kind != "decomposed" or len(attn.nodes) != 3:
            raise TailorError(f"attention patterns on ONNX need decomposed attention; "
                              f"{attn.nodes} is {attn.kind}")
        nodes = {n.name: n for n in model.graph}
        self.qk, softmax, self.pv = (nodes[name] for name in attn.nodes)
        self.q, self.kt = self.qk.inputs[0], self.qk.inputs[1]
        self.v = self.pv.inputs[1]
        self.guarded = _guarded(self.pv.outputs[0])
        if self.q.dtype not in (None, ir.DataType.FLOAT):
            raise TailorError(f"attention {attn.nodes[0]}: sparse patterns on ONNX run in float32, "
                              f"not {self.q.dtype}")
        self.steps: list[tuple[str, ir.Value]] = []   # ("mul" | "div" | "add", operand), in order
        value = softmax.inputs[0]
        while value.producer() is not self.qk:
            node = value.producer()
            if node is None or len(node.inputs) != 2:
                raise TailorError(f"attention {attn.nodes[0]}: cannot follow the scores to the softmax")
            ins = list(node.inputs)
            side = 0 if _reaches(ins[0], self.qk) else 1
            other = ins[1 - side]
            if node.op_type in _SCALE_OPS and side == 0 and _scalar(other):
                self.steps.append((node.op_type.lower(), other))
            elif node.op_type == "Add":
                self.steps.append(("add", other))
            else:
                raise TailorError(f"attention {attn.nodes[0]}: {node.op_type} between the scores and "
                                  f"the softmax has no sparse form here")
            value = ins[side]
        self.steps.reverse()
        heads = self.v.shape[1] if self.v.shape is not None and len(self.v.shape) == 4 else None
        if heads != attn.num_heads:
            raise TailorError(f"attention {attn.nodes[0]}: values are not [batch, {attn.num_heads} heads, "
                              f"sequence, {attn.head_dim}] (shape {self.v.shape})")
        for kind, operand in self.steps:
            if kind == "add" and not _mask_shape_ok(operand):
                raise TailorError(f"attention {attn.nodes[0]}: mask of shape {operand.shape} "
                                  f"(need [batch or 1, 1, queries or 1, keys])")


def _guarded(value: ir.Value) -> bool:
    """Is `value` zeroed where NaN right after, where(isnan(value), 0, value) (the guard
    tailor.rewriter.cleanup moves there from the probabilities)?"""
    uses = [u.node for u in value.uses()]
    test = [n for n in uses if n.op_type == "IsNaN"]
    where = [n for n in uses if n.op_type == "Where"]
    return len(uses) == 2 and len(test) == 1 and len(where) == 1 and where[0].inputs[0] is test[0].outputs[0]


def _reaches(value: ir.Value, target: ir.Node, depth: int = 8) -> bool:
    node = value.producer()
    if node is None or depth == 0:
        return False
    return node is target or any(i is not None and _reaches(i, target, depth - 1) for i in node.inputs)


def _scalar(value: ir.Value) -> bool:
    return value.shape is not None and all(d == 1 for d in value.shape)


def _mask_shape_ok(mask: ir.Value) -> bool:
    """[batch or 1, 1, queries or 1, keys], the dimensions known or not (a TorchScript export's
    mask has none: its heads' axis is read at run time, and a mask per head there, read whole,
    fails loudly where the heads run as two groups rather than mixing heads up)."""
    return mask.shape is not None and len(mask.shape) == 4 and (mask.shape[1] == 1 or not _known(mask, 1))


def _known(mask: ir.Value, axis: int) -> bool:
    """Whether the mask's dimension `axis` is a known number."""
    return isinstance(mask.shape[axis], int)


def sparse_core(model: ir.Model, attn: Attention) -> _Core:
    """The layer's attention core, read for the rewrite; TailorError (why) where it has no sparse form."""
    return _Core(model, attn)


def substitute(model: ir.Model, attn: Attention, patterns: list[Pattern | None]) -> None:
    """Rewrite one layer's attention core so that each KV head runs its pattern (None: dense)."""
    core = sparse_core(model, attn)
    per_kv = attn.num_heads // attn.num_kv_heads
    groups: dict[Pattern | None, list[int]] = {}
    for h in range(attn.num_heads):
        groups.setdefault(patterns[h // per_kv], []).append(h)
    b = _Builder(f"tailor_sparse/{attn.nodes[2]}")
    # queries and keys: the same positions in a prefill; with a KV cache the keys run on before
    # the queries (a decode step: one query, every cached key), the queries being the last ones
    seq_q, seq_k = b.dim(core.q, 2), b.dim(core.kt, 3)
    outs, order = [], []
    for pattern, heads in groups.items():
        split = len(groups) > 1
        pick = (lambda x, heads=heads: b.op("Gather", x, b.const(heads), axis=1)) if split else (lambda x: x)
        q, kt, v = pick(core.q), pick(core.kt), pick(core.v)
        if pattern is None:
            outs.append(_dense(b, core, q, kt, v))
        else:
            outs.append(_blocked(b, core, q, kt, v, seq_q, seq_k, pattern, attn.causal, attn.head_dim))
        order += heads
    out = outs[0] if len(outs) == 1 else b.op("Concat", *outs, axis=1)
    if order != sorted(order):
        out = b.op("Gather", out, b.const(np.argsort(order)), axis=1)
    model.graph.insert_before(core.pv, b.nodes)
    old = core.pv.outputs[0]
    out.shape, out.type = old.shape, old.type
    ir.convenience.replace_all_uses_with(old, out)


def _apply_steps(b: _Builder, core: _Core, scores, mask_part):
    """The original's scaling and masking on a part of the scores; `mask_part(mask)` is the part
    of the model's mask that lines up with them."""
    for kind, operand in core.steps:
        scores = b.op({"mul": "Mul", "div": "Div", "add": "Add"}[kind], scores,
                      mask_part(operand) if kind == "add" else operand)
    return scores


def _guard(b: _Builder, core: _Core, out):
    """A query whose every key is masked gets zeros, as the exporter's NaN guard gave it; on the
    output rows (head_dim wide) rather than the probabilities (keys wide): a NaN row there is
    what a NaN row of probabilities becomes. Left out where the core's output is guarded already."""
    return out if core.guarded else b.op("Where", b.op("IsNaN", out), b.const(0.0, np.float32), out)


def _dense(b: _Builder, core: _Core, q, kt, v):
    scores = _apply_steps(b, core, b.op("MatMul", q, kt), lambda m: m)
    return _guard(b, core, b.op("MatMul", b.op("Softmax", scores, axis=-1), v))


def _blocked(b: _Builder, core: _Core, q, kt, v, seq, seq_k, p: Pattern, causal: bool, head_dim: int):
    """`seq` queries, the last of `seq_k` keys (equal in a prefill): query row r is at position
    seq_k - seq + r, so a decode step's one query reads the sink and its window of the cache only."""
    blk = block_size(p)
    c = b.const
    one, zero = c([1]), c([0])
    # sizes (1-element int64 tensors): blocks, padded length, window at this length (the keys'),
    # its reach, and where the queries start among the keys
    n_blocks = b.op("Div", b.op("Add", seq, c([blk - 1])), c([blk]))
    padded = b.op("Mul", n_blocks, c([blk]))
    offset = b.op("Sub", seq_k, seq)
    length = b.op("Cast", seq_k, to=ir.DataType.DOUBLE)
    window = b.op("Cast", b.op("Floor", b.op("Add", c([p.alpha], np.float64),
                                             b.op("Mul", c([p.beta], np.float64), length))),
                  to=ir.DataType.INT64)
    window = b.op("Max", window, one)
    reach = b.op("Mul", b.op("Div", b.op("Add", window, c([blk - 2])), c([blk])), c([blk]))
    span = b.op("Add", b.op("Mul", reach, c([1 if causal else 2])), c([blk]))
    sink = b.op("Min", c([p.sink]), seq_k)
    # key index per (block, slot), and the keep mask per (query row, slot)
    block_starts = b.op("Mul", b.op("Range", c(0), b.op("Squeeze", n_blocks), c(1)), c(blk))
    starts = b.op("Sub", b.op("Add", block_starts, b.op("Squeeze", offset)), b.op("Squeeze", reach))
    keys = b.op("Add", b.op("Unsqueeze", starts, one), b.op("Range", c(0), b.op("Squeeze", span), c(1)))
    last_key = b.op("Sub", b.op("Squeeze", seq_k), c(1))
    gathered = b.op("Clip", keys, c(0), last_key)
    rows = b.op("Range", c(0), b.op("Squeeze", padded), c(1))
    row_keys = b.op("Reshape", b.op("Expand", b.op("Unsqueeze", keys, one),
                                     b.op("Concat", n_blocks, c([blk]), span, axis=0)),
                    b.op("Concat", padded, c([-1]), axis=0))               # [padded, span]
    row_gathered = b.op("Clip", row_keys, c(0), last_key)
    query = b.op("Unsqueeze", b.op("Add", rows, b.op("Squeeze", offset)), one)   # [padded, 1]: positions
    dist = b.op("Sub", query, row_keys)
    if not causal:
        dist = b.op("Abs", dist)
    keep = b.op("And", b.op("And", b.op("GreaterOrEqual", row_keys, b.op("Unsqueeze", sink, zero)),
                            b.op("Less", row_keys, seq_k)), b.op("Less", dist, window))
    if causal:
        keep = b.op("And", keep, b.op("LessOrEqual", row_keys, query))
    neg = c(-np.inf, np.float32)
    local_bias = b.op("Where", keep, c(0.0, np.float32), neg)              # [padded, span]
    sink_bias = None
    if causal:
        sink_cols = b.op("Range", c(0), b.op("Squeeze", sink), c(1))
        sink_bias = b.op("Where", b.op("LessOrEqual", sink_cols, query), c(0.0, np.float32), neg)
    # queries (and the model's mask rows) padded to whole blocks
    pads = b.op("Concat", c([0, 0, 0, 0, 0, 0]), b.op("Sub", padded, seq), c([0]), axis=0)
    q_pad = b.op("Pad", q, pads)
    q_blocks = b.op("Reshape", q_pad, c([0, 0, -1, blk, head_dim]))
    # the products: sink keys for every query, each block's window keys for its rows
    k_sink = b.op("Slice", kt, zero, sink, c([3]))
    s_sink = b.op("MatMul", q_pad, k_sink)                                # [B, H, padded, sink]
    # gathered as rows of head_dim (kᵀ's keys are its last, strided axis); onnxruntime folds the
    # transposes into the products
    k_rows = b.op("Gather", b.op("Transpose", kt, perm=[0, 1, 3, 2]), gathered, axis=2)
    k_local = b.op("Transpose", k_rows, perm=[0, 1, 2, 4, 3])              # [B, H, blocks, d, span]
    s_local = b.op("Reshape", b.op("MatMul", q_blocks, k_local),          # [B, H, padded, span]
                   b.op("Concat", c([0, 0]), padded, c([-1]), axis=0))

    padded_masks: dict[ir.Value, ir.Value] = {}

    def mask_rows(mask):
        """The model's mask [Bm, 1, rows, keys] with its query rows padded to `padded` (once:
        the local and the sink part both read it); rows of unknown number are broadcast to the
        queries' first."""
        if mask.shape[2] == 1:
            return mask
        if mask not in padded_masks:
            full = mask if _known(mask, 2) else \
                b.op("Expand", mask, b.op("Concat", one, one, seq, seq_k, axis=0))
            padded_masks[mask] = b.op("Pad", full, pads)
        return padded_masks[mask]

    def local_mask(mask):
        """The model's mask at the gathered keys, the pattern's keep mask folded in (one add)."""
        m = mask_rows(mask)
        if mask.shape[2] == 1:
            m = b.op("Gather", b.op("Squeeze", m, c([2])), row_gathered, axis=2)
        else:
            heads = one if _known(mask, 1) else b.dim(m, 1)
            index = b.op("Expand", row_gathered, b.op("Concat", b.dim(m, 0), heads, padded, span, axis=0))
            m = b.op("GatherElements", m, index, axis=3)
        return b.op("Add", m, local_bias)

    def sink_mask(mask):
        return b.op("Slice", mask_rows(mask), zero, sink, c([3]))

    s_local = _apply_steps(b, core, s_local, local_mask)
    if not any(kind == "add" for kind, _ in core.steps):
        s_local = b.op("Add", s_local, local_bias)
    s_sink = _apply_steps(b, core, s_sink, sink_mask)
    if sink_bias is not None:
        s_sink = b.op("Add", s_sink, sink_bias)
    probs = b.op("Softmax", b.op("Concat", s_sink, s_local, axis=-1), axis=-1)
    p_sink, p_local = b.op("Split", probs, b.op("Concat", sink, span, axis=0), axis=-1, num_outputs=2)
    v_sink = b.op("Slice", v, zero, sink, c([2]))
    v_local = b.op("Gather", v, gathered, axis=2)                          # [B, H, blocks, span, d]
    p_blocks = b.op("Reshape", p_local, b.op("Concat", c([0, 0]), n_blocks, c([blk]), span, axis=0))
    out_local = b.op("Reshape", b.op("MatMul", p_blocks, v_local), c([0, 0, -1, head_dim]))
    out = b.op("Add", b.op("MatMul", p_sink, v_sink), out_local)
    return _guard(b, core, b.op("Slice", out, zero, seq, c([2])))
