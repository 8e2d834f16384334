"""onnxruntime's fused operators written back as standard ONNX ops, at capture before recognition.

Graphs fused by onnxruntime's transformers optimizer, or written by the onnxruntime-genai model
builder, hold `com.microsoft` contrib ops (SkipLayerNormalization, BiasGelu, FastGelu, ...) that
recognition does not read. Each rule (one per file) computes what the op's definition says, so
the rewrite is exact; onnxruntime fuses the standard ops again when it loads the artifact, so
it costs no speed. Ops no rule writes back, and quantized ops tailor does not read
(tailor.rewriter.quantized), are named by `unsupported_ops`: the capture refuses such a graph in
one line rather than misreading it.
"""
from __future__ import annotations

from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from tailor.rewriter.quantized import QUANTIZED_OPS, unsupported
from tailor.rewriter.unfuse.base import UnfuseRule
from tailor.rewriter.unfuse.gather_block_quantized import GatherBlockQuantized
from tailor.rewriter.unfuse.gelu import GeluOps
from tailor.rewriter.unfuse.group_query_attention import GroupQueryAttention
from tailor.rewriter.unfuse.skip_norm import SkipNorm

RULES: dict[str, UnfuseRule] = {"skip_norm": SkipNorm(), "gelu": GeluOps(),
                                "group_query_attention": GroupQueryAttention(),
                                "gather_block_quantized": GatherBlockQuantized()}


def unfuse(model: ir.Model) -> dict[str, int]:
    """Write back every fused op a rule covers, in place; how many each rule rewrote (zeros left
    out). A node whose check fails stays, for `unsupported_ops` to name."""
    graph, done = model.graph, Counter()
    rules = {(r.domain, t): (name, r) for name, r in RULES.items() for t in r.op_types}
    for node in list(graph):
        found = rules.get((node.domain or "", node.op_type))
        if found is None or found[1].check(node) is not None:
            continue
        name, rule = found
        tape = ir.tape.Tape(graph)
        new = rule.rewrite(tape, node)
        for n in tape.nodes:  # every op written back keeps its first input's element type
            for v in n.outputs:
                v.dtype = v.dtype or n.inputs[0].dtype
        pairs = [(old, v) for old, v in zip(node.outputs, new) if v is not None]
        ir.convenience.replace_nodes_and_values(graph, node, [node], tape.nodes,
                                                [o for o, _ in pairs], [v for _, v in pairs])
        done[name] += 1
    if done:
        model.opset_imports[""] = max(model.opset_imports.get("", 20), 20)  # the Gelu op
        # what fed only the fused ops: a packed projection cut in three, GroupQueryAttention's
        # seqlens_k (recognition must not meet a MatMul or a mask subgraph nothing reads)
        common_passes.RemoveUnusedNodesPass()(model)
    return dict(done)


def unsupported_ops(model: ir.Model) -> str | None:
    """What tailor cannot rewrite through, counted ("quantized weights (MatMulNBits ×12)",
    "operators of com.microsoft (GroupQueryAttention ×2)"), or None."""
    quantized, other = unsupported(model), Counter()
    for n in model.graph:
        domain = n.domain or ""
        if domain not in ("", "ai.onnx") and not (domain == "com.microsoft" and n.op_type in QUANTIZED_OPS):
            other[f"{domain}:{n.op_type}"] += 1
    def counted(c: Counter) -> str:
        return ", ".join(f"{op} ×{n}" for op, n in c.most_common())
    parts = ([f"quantized weights ({counted(quantized)})"] if quantized else []) + \
        ([f"operators no rule writes back ({counted(other)})"] if other else [])
    return "; ".join(parts) or None
