"""Dataflow over an onnx_ir model (graphs from torch.onnx.export(dynamo=True) and similar)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tailor.rewriter import dataflow as df
from tailor.rewriter.dataflow import AttentionInfo, Dataflow, LinearInfo, ParamRef
from tailor.rewriter.quantized.qdq import after_activation_qdq, before_activation_qdq, dequantized_constant
from tailor.rewriter.quantized.weights import MICROSOFT, NBitsLinear, quantized_linear

_ONNX = {
    **dict.fromkeys(["Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Cast", "Identity",
                     "Dropout", "Flatten", "CastLike"], df.VIEW),
    "MatMul": df.MATMUL, "Gemm": df.LINEAR, "Attention": df.ATTENTION, "Softmax": df.SOFTMAX,
    "Add": df.ADD, "Sub": df.SUB, "Mul": df.MUL, "Div": df.DIV, "Neg": df.NEG, "Pow": df.POW,
    "Sqrt": df.SQRT, "Reciprocal": df.RECIPROCAL, "ReduceMean": df.REDUCE_MEAN,
    "LayerNormalization": df.LAYER_NORM, "RMSNormalization": df.RMS_NORM,
    "SimplifiedLayerNormalization": df.RMS_NORM, "Gather": df.GATHER, "Split": df.SPLIT,
    "Slice": df.SLICE, "Concat": df.CONCAT, "Cos": df.COS, "Sin": df.SIN, "Sigmoid": df.SIGMOID,
    "Tanh": df.TANH, "Relu": df.RELU, "Erf": df.ERF, "Gelu": df.GELU, "FastGelu": df.GELU,
    "Where": df.WHERE, "Less": df.COMPARE, "LessOrEqual": df.COMPARE, "Greater": df.COMPARE,
    "GreaterOrEqual": df.COMPARE, "Trilu": df.TRIANGLE,
}
_FLOAT = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
# integer tensors that are weights: quantized ones (a table looked up then dequantized, a
# quantized linear's weight)
_QUANTIZED = {ir.DataType.INT8, ir.DataType.UINT8}


class OnnxDataflow(Dataflow):
    backend = "onnx"

    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self._nodes = list(self.graph)  # onnx_ir keeps nodes topologically sorted when valid
        self._ops = {}
        for n in self._nodes:
            self._ops[n] = self._classify(n)

    def _classify(self, n: ir.Node) -> str:
        if n.domain == MICROSOFT and quantized_linear(n) is not None:
            return df.LINEAR
        if n.domain not in ("", "ai.onnx"):
            return df.OTHER
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and self.is_dynamic(n.inputs[0]):
            return df.VIEW  # an activation's quantization, or rows of a quantized table dequantized
        kind = _ONNX.get(n.op_type, df.OTHER)
        if kind == df.MATMUL and len(n.inputs) == 2 and self._matmul_weight(n) is not None:
            return df.LINEAR
        if kind == df.ADD and self._bias_of(n) is not None:
            return df.VIEW  # the bias half of a decomposed linear; the linear reports the bias
        if kind == df.GATHER and self.param(n.inputs[0]) is None:
            return df.OTHER  # indexing an activation (e.g. a CLS pooler), not an embedding
        return kind

    def _matmul_weight(self, n: ir.Node) -> tuple[ir.Value, str] | None:
        """A MatMul's 2-D weight and its layout: an initializer [in, out], or one [out, in] read
        through Transpose (how exporters write an lm_head tied to the embedding table; after
        quantize_dynamic, the quantized table transposed then dequantized; in a QDQ graph, the
        dequantized table transposed, then quantized and dequantized as an activation)."""
        w = n.inputs[1]
        if w is None:
            return None
        if self.param(w) is not None:
            return (w, "in_out") if len(self.param(w).shape) == 2 else None
        t = before_activation_qdq(w).producer()
        if t is not None and t.op_type == "DequantizeLinear" and t.inputs[0] is not None:
            t = t.inputs[0].producer()
        if t is not None and t.op_type == "Transpose" and self.param(t.inputs[0]) is not None \
                and len(self.param(t.inputs[0]).shape) == 2 \
                and list(t.attributes.get_ints("perm", [1, 0])) == [1, 0]:
            return t.inputs[0], "out_in"
        return None

    def _bias_of(self, add: ir.Node):
        """If `add` adds a 1-D weight to a linear's output, the weight value."""
        for i, v in enumerate(add.inputs[:2]):
            other = add.inputs[1 - i]
            if v is None or other is None or self.param(v) is None or len(self.param(v).shape) != 1:
                continue
            other = before_activation_qdq(other)
            prod = other.producer()
            if prod is not None and len(prod.inputs) > 1 and len(other.uses()) == 1 and (
                    (prod.op_type == "Gemm" and self.param(prod.inputs[1]) is not None)
                    or (prod.op_type == "MatMul" and self._matmul_weight(prod) is not None)
                    or quantized_linear(prod) is not None):
                return v
        return None

    # -- Dataflow interface -------------------------------------------------------------------
    def nodes(self):
        return self._nodes

    def op(self, node):
        return self._ops.get(node, df.OTHER)

    def inputs(self, node):
        return list(node.inputs)

    def outputs(self, node):
        return list(node.outputs)

    def producer(self, value):
        return value.producer() if value is not None else None

    def consumers(self, value):
        return [use.node for use in value.uses()]

    def node_name(self, node):
        return node.name or f"{node.op_type}_{id(node)}"

    def param(self, value):
        dequantized = dequantized_constant(value)
        if dequantized is not None:  # a QDQ weight: the quantized tensor it is made of
            value = dequantized.inputs[0]
        if value is None or not value.is_initializer() or value.const_value is None:
            return None
        t = value.const_value
        if t.dtype not in _FLOAT | _QUANTIZED or len(t.shape) == 0 or t.size <= 1:
            return None
        return ParamRef(value.name, tuple(int(d) for d in t.shape))

    def constant(self, value):
        if value is None or self.param(value) is not None:
            return None
        if value.const_value is not None:
            return value.const_value.numpy()
        prod = value.producer()
        if prod is not None and prod.op_type == "Constant" and "value" in prod.attributes:
            return prod.attributes["value"].as_tensor().numpy()
        return None

    def scalar_operand(self, node):
        for v in node.inputs:
            c = self.constant(v)
            if c is not None and c.size == 1:
                return float(c.reshape(()))
        return None

    def shape(self, value):
        if value is None or value.shape is None:
            return None
        return tuple(d if isinstance(d, int) else None for d in value.shape)

    def graph_inputs(self):
        return {v.name: v for v in self.graph.inputs}

    def graph_outputs(self):
        return list(self.graph.outputs)

    def linear(self, node):
        bias = None
        if node.op_type == "Gemm":
            w = self.param(node.inputs[1])
            if node.attributes.get_int("transA", 0):
                raise ValueError(f"Gemm {node.name} with transA is not a linear layer")
            layout = "out_in" if node.attributes.get_int("transB", 0) else "in_out"
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = self.param(node.inputs[2])
        elif isinstance(quantized := quantized_linear(node), NBitsLinear):
            # its packed blocks stand for a [N, K] matrix, whose shape recognition reads
            w, layout = ParamRef(node.inputs[1].name, (quantized.n, quantized.k)), "out_in"
        elif quantized is not None:
            w, layout = self.param(node.inputs[1]), "in_out"
        else:
            value, layout = self._matmul_weight(node)
            w = self.param(value)
        if bias is None:
            out = after_activation_qdq(node.outputs[0])
            users = [u.node for u in out.uses()]
            if len(users) == 1 and users[0].op_type == "Add":
                b = self._bias_of(users[0])
                bias = self.param(b) if b is not None else None
        return LinearInfo(w, bias, layout)

    def layer_norm_params(self, node):
        w = self.param(node.inputs[1]) if len(node.inputs) > 1 else None
        b = self.param(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        return w, b

    def attention(self, node):
        ins = list(node.inputs) + [None] * 4
        return AttentionInfo(ins[0], ins[1], ins[2], ins[3],
                             bool(node.attributes.get_int("is_causal", 0)))

    def split_range(self, node, value):
        in_shape = self.shape(node.inputs[0])
        if in_shape is None or in_shape[-1] is None:
            return None
        width, rank = in_shape[-1], len(in_shape)
        if node.op_type == "Split":
            axis = node.attributes.get_int("axis", 0)
            if axis not in (-1, rank - 1):
                return None
            index = list(node.outputs).index(value)
            n_out = len(node.outputs)
            sizes_v = node.inputs[1] if len(node.inputs) > 1 else None
            sizes = self.constant(sizes_v) if sizes_v is not None else None
            sizes = [int(s) for s in sizes] if sizes is not None else [-(-width // n_out)] * n_out
            start = sum(sizes[:index])
            return (start, min(width, start + sizes[index]), width)
        # Slice(data, starts, ends, axes, steps)
        consts = [self.constant(v) if v is not None else None for v in node.inputs[1:5]]
        starts, ends = consts[0], consts[1]
        if starts is None or ends is None:  # bounds computed at run time (rows of a rope cache)
            return None
        axes = consts[2] if len(consts) > 2 and consts[2] is not None else np.arange(len(starts))
        steps = consts[3] if len(consts) > 3 and consts[3] is not None else np.ones(len(starts))
        if starts is None or ends is None or len(axes) != 1 or int(steps[0]) != 1 \
                or int(axes[0]) not in (-1, rank - 1):
            return None
        start = int(starts[0]) + (width if int(starts[0]) < 0 else 0)
        stop = int(ends[0]) + (width if int(ends[0]) < 0 else 0)
        return (max(0, start), min(width, stop), width)

    def param_array(self, ref):
        return self.graph.initializers[ref.name].const_value.numpy().astype(np.float32)
