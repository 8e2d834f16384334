"""The exporter's NaN guard on attention probabilities, moved after their product with v.

torch.onnx exports a decomposed attention as where(isnan(p), 0, p) @ v with p = softmax(scores):
a query whose every key is masked (a padded row, -inf everywhere) gets zeros, not NaN. The
guard reads and writes the whole [queries, keys] matrix (MiniLM at 128 tokens: 5.6% of its
onnxruntime time); on the product, [queries, head_dim], it does the same for a fraction of that.
Exact: a softmax row is NaN as a whole (its sum is), its product row then is too, and zeroing
it gives the zeros the guard's zero row gave; rows with finite probabilities do not change.
(The two differ only where v itself holds NaN, in a model already broken.)"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase


class NanGuardAfterProduct(RewriteRuleClassBase):
    def pattern(self, op, scores, zero, v):
        probs = op.Softmax(scores, _outputs=["probs"])
        return op.MatMul(op.Where(op.IsNaN(probs), zero, probs), v)

    def check(self, context, scores, zero, v, probs, **_) -> MatchResult:
        check = MatchResult()
        fill = ir.convenience.get_const_tensor(zero)
        if fill is None or fill.numpy().size != 1 or fill.numpy().item() != 0:
            return check.fail("the guard does not fill with a constant 0")
        axis = probs.producer().attributes.get_int("axis", -1)
        rank = len(scores.shape) if scores.shape is not None else None
        if axis != -1 and axis != (rank or 0) - 1:
            return check.fail("the softmax is not over the last axis (the keys)")
        return check

    def rewrite(self, op, scores, zero, v, probs, **_):
        out = op.MatMul(op.Softmax(scores, axis=probs.producer().attributes.get_int("axis", -1)), v)
        return op.Where(op.IsNaN(out), zero, out)
