"""quantize_dynamic's linear, DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q, x_zero, W_zero) →
Cast → Mul by (x_scale · W_scale), read as the one com.microsoft op that computes it,
DynamicQuantizeMatMul(x, W_q, W_scale, W_zero): a linear whose input and output are float, as
recognition and the rewrites read linears. onnxruntime fuses the same chain into the same op
when it loads the input (MatMulIntegerToFloat, then DynamicQuantizeMatMul), so the artifact runs
the program the input ran. One DynamicQuantizeLinear feeds several products (q, k and v read one
input): its nodes stay until the last product is rewritten, and the sweep removes them."""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from tailor.rewriter.quantized.weights import MICROSOFT


class DynamicMatMul(RewriteRuleClassBase):
    def __init__(self):
        super().__init__(remove_nodes=False)  # the shared DynamicQuantizeLinear is swept after

    def pattern(self, op, x, w, w_scale, w_zero):
        x_q, x_scale, x_zero = op.DynamicQuantizeLinear(x, _outputs=3)
        product = op.Cast(op.MatMulInteger(x_q, w, x_zero, w_zero), to=ir.DataType.FLOAT)
        return op.Mul(product, op.Mul(x_scale, w_scale))

    def check(self, context, x, w, w_scale, w_zero, **_) -> MatchResult:
        check = MatchResult()
        for name, v in (("weight", w), ("weight scale", w_scale), ("weight zero point", w_zero)):
            if ir.convenience.get_const_tensor(v) is None:
                return check.fail(f"the {name} is not a constant")
        if len(w.shape or ()) != 2 or len(w_scale.shape or ()) > 1:
            return check.fail("the weight is not a matrix with per-tensor or per-column scales")
        return check

    def rewrite(self, op, x, w, w_scale, w_zero, **_):
        return op.DynamicQuantizeMatMul(x, w, w_scale, w_zero, _domain=MICROSOFT)
