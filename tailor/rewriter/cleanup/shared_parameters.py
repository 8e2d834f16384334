"""Parameters the exporter stored once for several layers, given back one initializer each.

torch.onnx's TorchScript exporter (Optimum's) keeps one initializer for equal tensors and reads
the others through Identity nodes: in a freshly initialised model every zero bias and every
norm weight of ones, in a trained one any two equal tensors. Recognition reads a layer's weights
as initializers, and the rewrites slice each layer's own; so each Identity of an initializer
becomes an initializer of its name holding the same tensor. Exact: the values are the same.
"""
from __future__ import annotations

import onnx_ir as ir


class SharedParameters:
    @staticmethod
    def apply(model: ir.Model) -> int:
        """Rewrite every Identity of an initializer in `model`; how many."""
        graph, done = model.graph, 0
        for node in list(graph):
            source = node.inputs[0] if node.op_type == "Identity" and node.domain in ("", "ai.onnx") else None
            out = node.outputs[0]
            if source is None or not source.is_initializer() or source.const_value is None \
                    or out in graph.outputs:
                continue
            # a tensor of its own: onnx_ir names an initializer's tensor after it, and a shared
            # tensor object (one backed by the caller's proto) would be renamed under the first
            tensor = ir.tensor(source.const_value.numpy(), name=out.name)
            own = ir.Value(name=out.name, shape=source.shape, type=source.type, const_value=tensor)
            out.name = f"{out.name}.read"  # the name goes to the initializer
            ir.convenience.replace_all_uses_with(out, own)
            graph.remove(node, safe=True)
            graph.register_initializer(own)
            done += 1
        return done
