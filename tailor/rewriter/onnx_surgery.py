"""Structural edits of an ONNX model (onnx_ir), addressed through the TransformerGraph.

The ONNX counterpart of torch_surgery: projections are found by the node names recognition
recorded, weights by their initializer names. Every edit is local (slice an initializer, point
the uses of one value at another, a constant in place of a branch) and dead nodes are swept
afterwards, so the graph stays whatever form the exporter wrote (decomposed or fused attention).
"""
from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from tailor.core.errors import TailorError
from tailor.rewriter.graph import Block, Projection, TransformerGraph
from tailor.rewriter.least_squares import compensate
from tailor.rewriter.onnx_kv_cache import drop_unread_caches, has_cache
from tailor.rewriter.quantized.qdq import after_activation_qdq
from tailor.rewriter.quantized.weights import QuantizedLinear, quantized_linear

NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"}


def nodes_by_name(model: ir.Model) -> dict[str, ir.Node]:
    return {n.name: n for n in model.graph}


def linear_output(node: ir.Node) -> ir.Value:
    """A projection's output, after its bias Add when the exporter split the bias off (and a
    QDQ graph's quantization of the product before it)."""
    out = after_activation_qdq(node.outputs[0])
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx]
        if other is not None and other.is_initializer() and len(other.shape or ()) == 1:
            return add.outputs[0]
    return out


# ops that pass a branch on as it is; a QDQ graph's quantization of an activation is one
VIEW_OPS = {"Reshape", "Identity", "Dropout", "Cast", "Squeeze", "Unsqueeze",
            "QuantizeLinear", "DequantizeLinear"}


def _residual_add(linear_out: ir.Value) -> tuple[ir.Node, ir.Value, ir.Value]:
    """The Add that puts a branch back into the residual stream: (the Add, the branch value it
    reads, after any reshapes between, and the stream it adds to)."""
    v = linear_out
    while True:
        uses = list(v.uses())
        add = next((u for u in uses if u.node.op_type == "Add" and len(u.node.inputs) == 2), None)
        if add is not None:
            return add.node, v, add.node.inputs[1 - add.idx]
        if len(uses) != 1 or uses[0].node.op_type not in VIEW_OPS:
            raise TailorError(f"no residual Add consumes {linear_out.name}: the block's residual "
                              f"stream is not in a form tailor can rewrite")
        v = uses[0].node.outputs[0]


class BlockValues:
    """The residual-stream values of one block, each branch's found when first asked for: a
    branch another pass already rewrote (an FFN bypassed, an attention made a constant) has lost
    the residual Add its projection fed, and only the branch a pass rewrites must be intact."""

    def __init__(self, nodes: dict[str, ir.Node], block: Block):
        self._nodes, self._block = nodes, block

    @functools.cached_property
    def _attn(self) -> tuple[ir.Node, ir.Value, ir.Value]:
        return _residual_add(linear_output(self._nodes[self._block.attn.o.node]))

    @functools.cached_property
    def _ffn(self) -> tuple[ir.Node, ir.Value, ir.Value]:
        return _residual_add(linear_output(self._nodes[self._block.ffn.down.node]))

    @property
    def attn_residual(self) -> tuple[ir.Node, ir.Value, ir.Value]:
        """(the Add, the attention branch it reads, the stream it adds to)."""
        return self._attn

    @property
    def ffn_residual(self) -> tuple[ir.Node, ir.Value, ir.Value]:
        return self._ffn

    @property
    def input(self) -> ir.Value:
        return self._attn[2]

    @property
    def attn_out(self) -> ir.Value:   # the attention branch's output, before its residual add
        return self._attn[1]

    @property
    def ffn_out(self) -> ir.Value:    # the FFN branch's output, before its residual add
        return self._ffn[1]

    @functools.cached_property
    def output(self) -> ir.Value:
        output = self._ffn[0].outputs[0]
        if self._block.residual == "post_norm":  # the block ends with the norm after its second add
            norm = next((u.node for u in after_activation_qdq(output).uses()
                         if u.node.op_type in NORM_OPS), None)
            if norm is not None:
                output = norm.outputs[0]
        return output


def block_values(model: ir.Model, graph: TransformerGraph) -> list[BlockValues]:
    nodes = nodes_by_name(model)
    return [BlockValues(nodes, b) for b in graph.blocks]


# ---- rewiring ------------------------------------------------------------------------------------

def bypass(model: ir.Model, old: ir.Value, new: ir.Value) -> None:
    """Every use of `old` (graph outputs included) reads `new` instead."""
    outputs = model.graph.outputs
    for i, v in enumerate(outputs):
        if v is old:
            # a graph output keeps its name: an Identity re-exposes `new` under it
            name = old.name
            old.name = f"{name}.bypassed"
            node = ir.node("Identity", [new], outputs=[ir.Value(name=name, type=old.type, shape=old.shape)])
            model.graph.append(node)
            outputs[i] = node.outputs[0]
    ir.convenience.replace_all_uses_with(old, new)


def replace_with_constant(model: ir.Model, branch: ir.Value, mean) -> None:
    """A residual branch becomes its mean output on calibration data (broadcast by its Add)."""
    users = list(branch.uses())
    if not users or any(u.node.op_type != "Add" for u in users):
        raise TailorError(f"{branch.name} is not consumed by residual Adds only; cannot make it constant")
    dtype = branch.dtype.numpy() if branch.dtype is not None else np.float32
    const = ir.Value(name=f"{branch.name}.mean",
                     const_value=ir.tensor(np.asarray(mean, dtype=dtype), name=f"{branch.name}.mean"))
    model.graph.register_initializer(const)
    ir.convenience.replace_all_uses_with(branch, const)


# ---- weights -----------------------------------------------------------------------------------

def _initializer(model: ir.Model, name: str) -> ir.Value:
    v = model.graph.initializers.get(name)
    if v is None or v.const_value is None:
        raise TailorError(f"initializer {name} not found in the ONNX model")
    return v


def _set_initializer(model: ir.Model, name: str, array: np.ndarray, user: ir.Node) -> None:
    """Give `user` the new tensor; in place when it is the initializer's only user."""
    old = _initializer(model, name)
    if len(list(old.uses())) == 1:
        old.const_value = ir.tensor(array, name=name)
        old.shape = ir.Shape(array.shape)
        return
    new = ir.Value(name=f"{name}.{user.name}", const_value=ir.tensor(array, name=f"{name}.{user.name}"))
    model.graph.register_initializer(new)
    for i, v in enumerate(user.inputs):
        if v is old:
            user.replace_input_with(i, new)


def _quantized(model: ir.Model, p: Projection) -> QuantizedLinear | None:
    return quantized_linear(nodes_by_name(model)[p.node])


def projection_arrays(model: ir.Model, p: Projection) -> tuple[np.ndarray, np.ndarray | None]:
    """(W [out, in], b [out] or None) of a projection, whatever its layout; a quantized weight
    dequantized."""
    quantized = _quantized(model, p)
    if quantized is not None:
        w = quantized.dequantized()
    else:
        w = _initializer(model, p.weight.name).const_value.numpy()
        w = w if p.layout == "out_in" else w.T
    bias = p.bias.name if p.bias is not None else _added_bias(p)  # its own, or one a rewrite added
    b = model.graph.initializers[bias].const_value.numpy() if bias in model.graph.initializers else None
    return w, b


def _bias_user(model: ir.Model, p: Projection) -> ir.Node:
    node = nodes_by_name(model)[p.node]
    out = after_activation_qdq(node.outputs[0])
    uses = list(out.uses())
    return uses[0].node if len(uses) == 1 and uses[0].node.op_type == "Add" else node


def _added_bias(p: Projection) -> str:
    """The initializer of the bias set_projection adds to a projection that had none."""
    return f"{p.node}.bias"


def set_projection(model: ir.Model, p: Projection, w: np.ndarray, b: np.ndarray | None) -> None:
    """Write W [out, in] and b back in the projection's layout (a quantized weight quantized
    again, in its own scheme); a bias it had none of is added."""
    quantized = _quantized(model, p)
    if quantized is not None:
        _set_quantized(model, quantized, quantized.quantized(w), w.shape)
    else:
        w = np.ascontiguousarray(w if p.layout == "out_in" else w.T)
        _set_initializer(model, p.weight.name, w, nodes_by_name(model)[p.node])
    _set_bias(model, p, b)


def _set_quantized(model: ir.Model, q: QuantizedLinear, arrays: dict[int, np.ndarray],
                   shape: tuple[int, int]) -> None:
    """A quantized linear's weight group, by input index, for a weight of `shape` [out, in]."""
    for i, array in arrays.items():
        _set_initializer(model, q.holder.inputs[i].name, array, q.holder)
    for name, value in q.attributes(*shape).items():
        q.node.attributes[name] = ir.AttrInt64(name, value)


def _set_bias(model: ir.Model, p: Projection, b: np.ndarray | None) -> None:
    """Write the projection's bias (None: leave it as it is); one it had none of is added."""
    node = nodes_by_name(model)[p.node]
    if b is None:
        return
    if p.bias is not None:
        _set_initializer(model, p.bias.name, np.ascontiguousarray(b), _bias_user(model, p))
        return
    name = _added_bias(p)
    if name in model.graph.initializers:  # added by an earlier rewrite
        _set_initializer(model, name, np.ascontiguousarray(b), _bias_user(model, p))
        return
    # a projection without bias gets one: Add after it
    out = node.outputs[0]
    bias = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(b), name=name))
    model.graph.register_initializer(bias)
    added = ir.Value(name=f"{out.name}.biased", type=out.type)
    add = ir.node("Add", [out, bias], outputs=[added])
    ir.convenience.replace_all_uses_with(out, added)
    add.replace_input_with(0, out)
    model.graph.insert_after(node, add)


def reconstruct_inputs(model: ir.Model, p: Projection, kept, gram) -> None:
    """Keep input channels `kept` of an ONNX projection, compensated (least_squares.compensate)."""
    w, b = projection_arrays(model, p)
    w_kept, bias = compensate(w, b, gram, np.asarray(kept))
    set_projection(model, p, w_kept.astype(w.dtype), bias.astype(w.dtype))


def drop_inputs(model: ir.Model, p: Projection, cols) -> None:
    """Keep input columns `cols` of a projection, with the bias reconstruct_inputs would give it
    (zero): the same program without calibration statistics (a variant timed for its shape)."""
    w, _ = projection_arrays(model, p)
    if _quantized(model, p) is not None:
        slice_projection(model, p, cols=cols)
        _set_bias(model, p, np.zeros(w.shape[0], w.dtype))
        return
    set_projection(model, p, w[:, cols], np.zeros(w.shape[0], w.dtype))


def slice_projection(model: ir.Model, p: Projection, *, rows=None, cols=None) -> None:
    """Keep output rows `rows` and input columns `cols` of a projection. A quantized weight is cut
    as it is where the cut keeps whole quantization groups, else quantized again after the cut."""
    w, b = projection_arrays(model, p)
    quantized = _quantized(model, p)
    if quantized is not None:
        shape = (len(rows) if rows is not None else w.shape[0], len(cols) if cols is not None else w.shape[1])
        arrays = quantized.sliced(rows, cols)
        if arrays is None:
            cut = w if rows is None else w[rows]
            arrays = quantized.quantized(cut if cols is None else cut[:, cols])
        _set_quantized(model, quantized, arrays, shape)
        _set_bias(model, p, b[rows] if b is not None and rows is not None else None)
        return
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    set_projection(model, p, w, b)


# ---- head counts in shape constants ----------------------------------------------------------------

def region(model: ir.Model, starts: list[Projection], end: Projection) -> list[ir.Node]:
    """The nodes between the outputs of projections `starts` and the input of projection `end`
    (an attention's core from q/k/v to o; an FFN's activation from up/gate to down)."""
    nodes = nodes_by_name(model)
    ahead: set[ir.Node] = set()
    todo = [u.node for p in starts for u in linear_output(nodes[p.node]).uses()]
    while todo:
        n = todo.pop()
        if n not in ahead:
            ahead.add(n)
            todo.extend(u.node for v in n.outputs for u in v.uses())
    behind: set[ir.Node] = set()
    todo = [nodes[end.node].inputs[0].producer()]
    while todo:
        n = todo.pop()
        if n is not None and n not in behind:
            behind.add(n)
            todo.extend(v.producer() for v in n.inputs if v is not None)
    return [n for n in model.graph if n in ahead and n in behind]


def rewrite_shapes(model: ir.Model, nodes: list[ir.Node], edit) -> None:
    """Rewrite literal sizes in the shape inputs of Reshape/Expand nodes: edit(node, values) gives
    {position: new size} for the shape's values (None where not a constant). Shapes are one
    constant or Concats of one-element pieces; a Concat is copied before editing, since exporters
    share them across layers."""
    for node in nodes:
        if node.op_type not in ("Reshape", "Expand") or node.inputs[1] is None:
            continue
        reader, shape = _shape_reader(node)
        const = ir.convenience.get_const_tensor(shape)
        concat = shape.producer() if const is None else None
        if const is not None:
            values = [int(x) for x in const.numpy().reshape(-1)]
        elif concat is not None and concat.op_type == "Concat":
            pieces = [ir.convenience.get_const_tensor(v) if v is not None else None for v in concat.inputs]
            values = [int(c.numpy().reshape(-1)[0]) if c is not None and c.size == 1 else None
                      for c in pieces]
        else:
            continue
        edits = {pos: v for pos, v in edit(node, values).items() if values[pos] != v}
        if not edits:
            continue
        if const is not None:
            arr = const.numpy().reshape(-1).copy()
            for pos, v in edits.items():
                arr[pos] = v
            c = ir.Value(name=f"{node.name}.shape", const_value=ir.tensor(arr, name=f"{node.name}.shape"))
            model.graph.register_initializer(c)
            node.replace_input_with(1, c)
            continue
        inputs = list(concat.inputs)
        for pos, v in edits.items():
            name = f"{node.name}.shape{pos}"
            dtype = ir.convenience.get_const_tensor(inputs[pos]).numpy().dtype
            c = ir.Value(name=name, const_value=ir.tensor(np.asarray([v], dtype=dtype), name=name))
            model.graph.register_initializer(c)
            inputs[pos] = c
        copy = ir.node("Concat", inputs, attributes={"axis": 0},
                       outputs=[ir.Value(name=f"{node.name}.shape", type=shape.type)])
        model.graph.insert_before(reader, copy)
        reader.replace_input_with(next(i for i, v in enumerate(reader.inputs) if v is shape), copy.outputs[0])


def _shape_reader(node: ir.Node) -> tuple[ir.Node, ir.Value]:
    """The node that reads a Reshape/Expand's target shape as it was built, and that value. The
    TorchScript exporter (Optimum's) writes an Expand's target as Where(Equal(s, -1), 1, s) with
    s = Reshape(Concat(...), [-1]) (torch's -1 keeps a size; ONNX's Expand has none): then the
    Reshape reading the Concat, so that one edit of the Concat serves both reads of it."""
    shape = node.inputs[1]
    where = shape.producer()
    if node.op_type == "Expand" and where is not None and where.op_type == "Where" and len(where.inputs) == 3:
        flat = where.inputs[2].producer() if where.inputs[2] is not None else None
        if flat is not None and flat.op_type == "Reshape" and flat.inputs[0] is not None:
            return flat, flat.inputs[0]
    return node, shape


def set_head_counts(model: ir.Model, block: Block, heads: int, kv_heads: int) -> None:
    """Head counts in the attention's shapes: exporters write GQA's key/value expansion as Expand
    to [B, kv, groups, T, D] then Reshape to [B, heads, T, D] with literal counts ([B, T, -1, D]
    needs nothing). An export of fixed batch (and length) writes the counts wherever they are:
    [B, T, heads or kv, D], keys transposed [B, heads, D, T], heads merged [B, T, heads·D], and
    batch and heads folded together for batched products, [B·heads, T, D]."""
    a = block.attn
    old = {"heads": a.num_heads, "kv": a.num_kv_heads, "groups": a.num_heads // a.num_kv_heads}
    new = {"heads": heads, "kv": kv_heads, "groups": heads // max(kv_heads, 1)}

    def recount(value, unit: int = 1) -> int | None:
        """`value` as the new count of query heads, or else of KV heads, times `unit`."""
        return next((new[role] * unit for role in ("heads", "kv") if value == old[role] * unit), None)

    def edit(node, values):
        if node.op_type == "Expand" and len(values) == 5:
            return {pos: new[role] for pos, role in ((1, "kv"), (2, "groups")) if values[pos] == old[role]}
        if len(values) == 4 and a.head_dim in values[2:]:
            per_head = 3 if values[3] == a.head_dim else 2  # where D is: the count is beside it
            counts = {pos: recount(values[pos]) for pos in (1, 2) if pos != per_head}
        elif len(values) == 3 and a.head_dim in values[1:] and values[0] and values[0] % old["heads"] == 0:
            counts = {0: values[0] // old["heads"] * new["heads"]}
        elif len(values) == 3:
            counts = {2: recount(values[2], a.head_dim)}
        else:
            counts = {}
        return {pos: n for pos, n in counts.items() if n is not None}

    nodes = region(model, [a.q, a.k, a.v], a.o)
    rewrite_shapes(model, nodes, edit)
    _recount_repeated_heads(model, nodes, old["groups"], new["groups"])


def _recount_repeated_heads(model: ir.Model, nodes: list[ir.Node], old_groups: int, new_groups: int) -> None:
    """The TorchScript exporter writes the head count of repeated keys and values (GQA's
    repeat_kv) as the KV count read from the tensor's shape times the literal group count:
    Reshape to Concat(B, Unsqueeze(Mul(Gather(Shape(kv), 1), groups)), T, D). Each such literal
    becomes the new group count (its own initializer: exporters share constants)."""
    if old_groups == new_groups:
        return
    for node in nodes:
        if node.op_type != "Reshape" or node.inputs[1] is None:
            continue
        concat = node.inputs[1].producer()
        if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 4 \
                or concat.inputs[1] is None:
            continue
        unsqueeze = concat.inputs[1].producer()
        mul = unsqueeze.inputs[0].producer() if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze" \
            and unsqueeze.inputs[0] is not None else None
        if mul is None or mul.op_type != "Mul" or not _reads_head_count(mul.inputs[0]):
            continue
        factor = ir.convenience.get_const_tensor(mul.inputs[1])
        if factor is None or factor.size != 1 or int(factor.numpy().reshape(-1)[0]) != old_groups:
            continue
        name = f"{mul.name}.groups"
        groups = np.asarray(new_groups, dtype=factor.numpy().dtype)
        c = ir.Value(name=name, const_value=ir.tensor(groups, name=name))
        model.graph.register_initializer(c)
        mul.replace_input_with(1, c)


def _reads_head_count(value: ir.Value | None) -> bool:
    """Whether `value` is Gather(Shape(x), 1): the head axis of a [B, heads, T, D] tensor."""
    gather = value.producer() if value is not None else None
    if gather is None or gather.op_type != "Gather" or gather.inputs[0] is None:
        return False
    index = ir.convenience.get_const_tensor(gather.inputs[1])
    shape = gather.inputs[0].producer()
    return shape is not None and shape.op_type == "Shape" and index is not None and index.size == 1 \
        and int(index.numpy().reshape(-1)[0]) == 1


def set_ffn_width(model: ir.Model, block: Block, width: int) -> None:
    """The FFN width in shapes between its projections (Conv1D exports flatten to [-1, width])."""
    f = block.ffn

    def edit(node, values):
        return {len(values) - 1: width} if values and values[-1] == f.width else {}

    rewrite_shapes(model, region(model, [p for p in (f.gate, f.up) if p is not None], f.down), edit)


def expose(model: ir.Model, values: list[ir.Value]) -> None:
    """Make intermediate values graph outputs, under their own names (for onnxruntime to return)."""
    present = set(model.graph.outputs)
    for v in values:
        if v not in present:
            if v.type is None:
                v.type = ir.TensorType(ir.DataType.FLOAT)
            model.graph.outputs.append(v)
            present.add(v)


# ---- finishing -------------------------------------------------------------------------------------

def finish(model: ir.Model) -> ir.Model:
    """Sweep dead nodes and initializers, and the KV caches no attention reads any more
    (onnx_kv_cache); re-infer the intermediate shapes the edits made stale.

    Inferred again rather than left out: onnxruntime's fusions check them (without shapes, MiniLM
    kept its Add + LayerNormalization pairs apart instead of fusing them into SkipLayerNormalization)."""
    common_passes.RemoveUnusedNodesPass()(model)
    if has_cache(model):
        drop_unread_caches(model)
    keep = set(model.graph.inputs) | set(model.graph.outputs)
    before = {}
    for node in model.graph:
        quantized = quantized_linear(node)
        if quantized is not None and node.outputs[0].shape is not None:
            # onnx's inference knows no onnxruntime op: their outputs are given, [..., out]
            out = node.outputs[0]
            out.shape = ir.Shape([*out.shape[:-1], quantized.out_features])
            keep.add(out)
        for v in node.outputs:
            if v not in keep:
                before[v], v.shape = v.shape, None
    common_passes.ShapeInferencePass()(model)
    for v, old in before.items():
        v.shape = _with_named_dims(v.shape, old)
    return model


def _placeholder(d) -> bool:
    """A dimension inference named only to tell it apart (unk__N), not one the graph's inputs name."""
    return isinstance(d, ir.SymbolicDim) and (d.value is None or d.value.startswith("unk__"))


def _with_named_dims(new: ir.Shape | None, old: ir.Shape | None) -> ir.Shape | None:
    """`new` with the named dimensions (batch, sequence) of `old` where inference lost them:
    fusions such as SkipLayerNormalization need both inputs provably of one shape. Rewrites
    change only literal sizes (heads, channels), never a named dimension. The placeholders that
    inference itself makes (unk__N, numbered afresh) become unnamed: the input's own (a
    TorchScript export's mask is [unk__53, ...]) would otherwise name unrelated sizes alike, which
    onnxruntime's memory planner takes for equal (a block-sparse core's [1, 2, 20, 4] buffer was
    reused for a [1, 1, 32, 20] one)."""
    if new is None:
        return None
    if old is None or len(new) != len(old):
        old = [None] * len(new)
    return ir.Shape([o if _placeholder(n) and isinstance(o, ir.SymbolicDim) and o.value is not None else
                     ir.SymbolicDim(None) if _placeholder(n) else n for n, o in zip(new, old)])


def clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))
