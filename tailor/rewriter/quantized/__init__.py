"""Quantized linears, read at capture so that the structural rewrites cut their weights as they
are (tailor.rewriter.quantized.weights): the artifact stays quantized.

Read: onnxruntime's quantize_dynamic output (its MatMulInteger chains become DynamicQuantizeMatMul,
the op onnxruntime fuses them into: dynamic_matmul; its quantized embedding tables, a Gather
then DequantizeLinear, are looked up as they are), QDQ graphs from quantize_static (qdq), and
MatMulNBits with 4-bit weights (from onnxruntime's MatMulNBitsQuantizer), a linear as it stands.
Every other quantized op (QLinearMatMul and the other QOperator ops, MatMulInteger in another
form, MatMulNBits of other widths or with g_idx) is named by `unsupported`, and capture refuses
the graph in one line.
"""
from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.rewriter import RewriteRuleSet

from tailor.rewriter.quantized.dynamic_matmul import DynamicMatMul
from tailor.rewriter.quantized.qdq import activation_pair, fold_small_constants
from tailor.rewriter.quantized.weights import NBITS_MATMUL, nbits_refusal, qdq_weight, quantized_linear

# ops that hold quantized weights or activations, in the standard and onnxruntime's domains
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "QLinearMatMul", "ConvInteger", "QLinearConv", "MatMulNBits", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "QGemm", "QAttention", "GatherBlockQuantized"}


def read_quantized(model: ir.Model) -> dict[str, int]:
    """In place: quantize_dynamic's chains as DynamicQuantizeMatMul, a QDQ graph's small
    constants as floats; how many of each (zeros left out)."""
    done = {}
    if any(n.op_type == "MatMulInteger" for n in model.graph):
        done["dynamic_matmul"] = RewriteRuleSet([DynamicMatMul.rule()], commute=True).apply_to_model(model)
    if any(n.op_type == "DequantizeLinear" for n in model.graph):
        done["qdq_constants"] = fold_small_constants(model)
    if any(done.values()):
        common_passes.RemoveUnusedNodesPass()(model)
    return {k: n for k, n in done.items() if n}


def _read(node: ir.Node) -> bool:
    """Whether tailor reads this quantized op: a quantized linear, an activation's QDQ pair,
    a quantized table's lookup (quantize_dynamic: Gather then DequantizeLinear; QDQ:
    DequantizeLinear then Gather) or its transpose for a tied lm head (quantize_dynamic:
    Transpose then DequantizeLinear; QDQ: DequantizeLinear then Transpose), or a QDQ MatMul's
    weight."""
    if quantized_linear(node) is not None or activation_pair(node):
        return True
    if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
        return False
    read = node.inputs[0].producer()
    if read is not None:
        return read.op_type in ("Gather", "Transpose") and read.inputs[0] is not None \
            and read.inputs[0].const_value is not None
    uses = list(node.outputs[0].uses())
    return node.inputs[0].const_value is not None and bool(uses) and all(
        (u.node.op_type in ("Gather", "Transpose") and u.idx == 0) or qdq_weight(u.node) is node
        for u in uses)


def unsupported(model: ir.Model) -> Counter:
    """The quantized ops tailor does not read, counted by op type (a MatMulNBits with why)."""
    def named(n: ir.Node) -> str:
        why = nbits_refusal(n) if n.op_type == NBITS_MATMUL else None
        return f"{n.op_type} with {why}" if why else n.op_type

    return Counter(named(n) for n in model.graph
                   if n.op_type in QUANTIZED_OPS and (n.domain or "") in ("", "ai.onnx", "com.microsoft")
                   and not _read(n))
