"""Quantized linears, read at capture so that the structural rewrites cut their weights as they
are (tailor.rewriter.quantized.weights): the artifact stays quantized.

Read: onnxruntime's quantize_dynamic output (its MatMulInteger chains become DynamicQuantizeMatMul,
the op onnxruntime fuses them into: dynamic_matmul; its quantized embedding tables, a Gather
then DequantizeLinear, are looked up as they are), and MatMulNBits with 4-bit weights (from
onnxruntime's MatMulNBitsQuantizer), a linear as it stands. Every other quantized op (QDQ
pairs, QLinearMatMul, MatMulInteger in another form, MatMulNBits of other widths or with g_idx)
is named by `unsupported`, and capture refuses the graph in one line.
"""
from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import RewriteRuleSet

from tailor.rewriter.quantized.dynamic_matmul import DynamicMatMul
from tailor.rewriter.quantized.weights import quantized_linear

# ops that hold quantized weights or activations, in the standard and onnxruntime's domains
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "QLinearMatMul", "ConvInteger", "QLinearConv", "MatMulNBits", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "QGemm", "QAttention", "GatherBlockQuantized"}


def read_quantized(model: ir.Model) -> dict[str, int]:
    """quantize_dynamic's chains as DynamicQuantizeMatMul, in place; how many (zeros left out)."""
    if not any(n.op_type == "MatMulInteger" for n in model.graph):
        return {}
    count = RewriteRuleSet([DynamicMatMul.rule()], commute=True).apply_to_model(model)
    common_passes.RemoveUnusedNodesPass()(model)
    return {"dynamic_matmul": count} if count else {}


def _embedding_lookup(node: ir.Node) -> bool:
    """DequantizeLinear of rows looked up in a constant quantized table (quantize_dynamic's Gather)."""
    looked_up = node.inputs[0].producer() if node.inputs[0] is not None else None
    return node.op_type == "DequantizeLinear" and looked_up is not None and looked_up.op_type == "Gather" \
        and looked_up.inputs[0] is not None and looked_up.inputs[0].const_value is not None


def unsupported(model: ir.Model) -> Counter:
    """The quantized ops tailor does not read, counted by op type."""
    return Counter(n.op_type for n in model.graph
                   if n.op_type in QUANTIZED_OPS and (n.domain or "") in ("", "ai.onnx", "com.microsoft")
                   and quantized_linear(n) is None and not _embedding_lookup(n))
