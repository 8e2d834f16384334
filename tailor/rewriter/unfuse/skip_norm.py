"""SkipLayerNormalization / SkipSimplifiedLayerNormalization: a residual add fused into the
norm after it (onnxruntime's transformers optimizer writes them; the genai model builder writes
the simplified one):

    s = input + skip (+ bias);  output = LayerNorm(s) or RMSNorm(s);  optional 4th output: s

Written back as the adds and the norm: LayerNormalization (opset 17), and RMSNorm decomposed as
torch exports it (x · 1/sqrt(mean(x²) + eps) · gamma), which recognition reads. The bias is added
to the input first, where an exporter puts a linear's bias."""
from __future__ import annotations

import onnx_ir as ir

from tailor.rewriter.unfuse.base import UnfuseRule, add_bias, constant, given, used


class SkipNorm(UnfuseRule):
    op_types = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")

    def check(self, node: ir.Node) -> str | None:
        if any(used(o) for o in node.outputs[1:3]):
            return "its mean / inverse-std outputs are read"
        return None

    def rewrite(self, tape: ir.tape.Tape, node: ir.Node) -> list[ir.Value | None]:
        simplified = node.op_type == "SkipSimplifiedLayerNormalization"
        x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
        beta, bias = (None, given(node, 3)) if simplified else (given(node, 3), given(node, 4))
        eps = node.attributes.get_float("epsilon", 1e-5 if simplified else 1e-12)
        s = tape.op("Add", [add_bias(tape, x, bias), skip])
        if simplified:
            out = rms_norm(tape, node, s, gamma, eps)
        else:
            out = tape.op("LayerNormalization", [s, gamma] + ([beta] if beta is not None else []),
                          attributes={"axis": -1, "epsilon": eps})
        sum_out = s if len(node.outputs) > 3 else None
        return [out, None, None, sum_out][: len(node.outputs)]


def rms_norm(tape: ir.tape.Tape, node: ir.Node, x: ir.Value, gamma: ir.Value, eps: float) -> ir.Value:
    """gamma · x / sqrt(mean(x²) + eps) over the last axis, in standard ops."""
    two = constant(tape, node, "two", 2.0, gamma)
    axes = tape.initializer(ir.tensor([-1], dtype=ir.DataType.INT64, name=f"{node.name}_axes"))
    mean = tape.op("ReduceMean", [tape.op("Pow", [x, two]), axes], attributes={"keepdims": 1})
    rms = tape.op("Sqrt", [tape.op("Add", [mean, constant(tape, node, "eps", eps, gamma)])])
    return tape.op("Mul", [gamma, tape.op("Mul", [x, tape.op("Reciprocal", [rms])])])
