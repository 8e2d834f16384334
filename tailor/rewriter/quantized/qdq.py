"""QDQ graphs (onnxruntime's quantize_static, QuantFormat.QDQ): every weight read through a
DequantizeLinear of its int8 tensor, every activation quantized and dequantized again
(QuantizeLinear → DequantizeLinear, at ranges calibrated on the input model).

Read as they stand: a MatMul whose weight is such a DequantizeLinear is a quantized linear
(weights.qdq_weight), an activation's QuantizeLinear → DequantizeLinear pair is a view of it.
Only the small constants (norm weights, biases, rotary frequencies, epsilons) are written as the
float values their DequantizeLinear computes, at capture: recognition and the rewrites read
them as numbers, they are a few kilobytes, and a bias that compensation rewrites is float anyway.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


def dequantized_constant(value: ir.Value | None) -> ir.Node | None:
    """The DequantizeLinear that makes `value` of a constant quantized tensor, or None."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "DequantizeLinear" or node.inputs[0] is None:
        return None
    return node if node.inputs[0].const_value is not None else None


def _dequantize(node: ir.Node) -> np.ndarray:
    q, scale = node.inputs[0].const_value.numpy(), node.inputs[1].const_value.numpy()
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    zero = zero.const_value.numpy().astype(np.float64) if zero is not None else 0.0
    return ((q.astype(np.float64) - zero) * scale.astype(np.float64)).astype(scale.dtype)


def fold_small_constants(model: ir.Model) -> int:
    """Each DequantizeLinear of a constant scalar or vector becomes the float initializer it
    computes (exact: the same arithmetic, in float64 then the scale's type); how many."""
    count = 0
    for node in list(model.graph):
        if dequantized_constant(node.outputs[0]) is not node or len(node.inputs[0].const_value.shape) > 1 \
                or any(v is not None and v.const_value is None for v in node.inputs[1:]):
            continue
        name = f"{node.inputs[0].name}.dequantized"
        value = ir.Value(name=name, const_value=ir.tensor(_dequantize(node), name=name))
        model.graph.register_initializer(value)
        ir.convenience.replace_all_uses_with(node.outputs[0], value)
        count += 1
    return count


def before_activation_qdq(value: ir.Value) -> ir.Value:
    """The value a QDQ graph quantizes and dequantizes into `value` (QuantizeLinear then
    DequantizeLinear, each read once), or `value` where there is no such pair."""
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None or len(value.uses()) > 1:
        return value
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or len(dq.inputs[0].uses()) != 1 or q.inputs[0] is None:
        return value
    return q.inputs[0]


def after_activation_qdq(value: ir.Value) -> ir.Value:
    """The value `value` becomes through a QuantizeLinear → DequantizeLinear pair that alone
    reads it, or `value` where there is no such pair."""
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].node.op_type != "QuantizeLinear":
        return value
    dq = list(uses[0].node.outputs[0].uses())
    if len(dq) != 1 or dq[0].node.op_type != "DequantizeLinear":
        return value
    return dq[0].node.outputs[0]


def activation_pair(node: ir.Node) -> bool:
    """Whether `node` is half of an activation's QuantizeLinear → DequantizeLinear pair."""
    if node.op_type == "QuantizeLinear":
        return bool(node.outputs[0].uses()) and all(u.node.op_type == "DequantizeLinear"
                                                   for u in node.outputs[0].uses())
    if node.op_type == "DequantizeLinear" and node.inputs[0] is not None:
        q = node.inputs[0].producer()
        return q is not None and q.op_type == "QuantizeLinear"
    return False
