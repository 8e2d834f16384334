"""onnxruntime's GELU contrib ops: Gelu (erf), BiasGelu (bias + erf GELU) and FastGelu (bias +
tanh approximation), written back as the bias add and the standard Gelu op (opset 20), whose
`approximate` attribute says which of the two."""
from __future__ import annotations

import onnx_ir as ir

from tailor.rewriter.unfuse.base import UnfuseRule, add_bias, given


class GeluOps(UnfuseRule):
    op_types = ("Gelu", "BiasGelu", "FastGelu")

    def rewrite(self, tape: ir.tape.Tape, node: ir.Node) -> list[ir.Value | None]:
        approximate = "tanh" if node.op_type == "FastGelu" else "none"
        x = add_bias(tape, node.inputs[0], given(node, 1))
        return [tape.op("Gelu", [x], attributes={"approximate": approximate}, version=20)]
