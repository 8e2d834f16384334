"""Lossless clean-ups of an input ONNX graph, applied at capture before anything is recognized:
one per file, exact for every input the model gives finite outputs for; graph passes (a class
with apply(model) -> sites) first, then onnxscript rewrite rules. The search prices the
rewritten model against the input as the user gave it: a measured target times the two
(CostModel.baseline), so what a clean-up saves loosens the lossy budget."""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import RewriteRuleSet

from tailor.rewriter.cleanup.nan_guard_after_product import NanGuardAfterProduct
from tailor.rewriter.cleanup.shared_parameters import SharedParameters
from tailor.rewriter.cleanup.table_read_transposed import TableReadTransposed

PASSES = {"shared_parameters": SharedParameters, "table_read_transposed": TableReadTransposed}
RULES = {"nan_guard_after_product": NanGuardAfterProduct}


def clean(model: ir.Model) -> dict[str, int]:
    """Apply every rule to `model` in place; how many sites each rewrote (zeros left out)."""
    done = {}
    for name, graph_pass in PASSES.items():
        count = graph_pass.apply(model)
        if count:
            done[name] = count
    for name, rule in RULES.items():
        count = RewriteRuleSet([rule.rule()]).apply_to_model(model)
        if count:
            done[name] = count
    return done
