"""A token table stored as the tied lm_head's weight [hidden, vocab] and looked up through a
Transpose (onnxruntime-genai's model builder writes Gather(Transpose(lm_head.weight), ids)),
given back as exporters store a tied pair: the table [vocab, hidden] as the initializer, looked
up directly, and the lm_head reading it transposed. Recognition finds the embedding as a lookup
of a weight, and the tie as one weight read twice. Exact: the same values are read."""
from __future__ import annotations

import onnx_ir as ir


class TableReadTransposed:
    @staticmethod
    def apply(model: ir.Model) -> int:
        """Rewrite every Gather of a transposed 2-D initializer in `model`; how many."""
        graph, done = model.graph, 0
        for gather in list(graph):
            if gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx") \
                    or gather.attributes.get_int("axis", 0) != 0:
                continue
            transpose = gather.inputs[0].producer()
            weight = transpose.inputs[0] if transpose is not None and transpose.op_type == "Transpose" \
                and list(transpose.attributes.get_ints("perm", [1, 0])) == [1, 0] else None
            if weight is None or not weight.is_initializer() or weight.const_value is None \
                    or len(weight.shape) != 2 or len(gather.inputs[0].uses()) != 1:
                continue
            name = weight.name
            weight.name = f"{name}.in_out"
            table = ir.Value(name=name, const_value=ir.tensor(weight.const_value.numpy().T.copy(), name=name))
            graph.register_initializer(table)
            gather.replace_input_with(0, table)
            graph.remove(transpose, safe=True)
            if weight.uses():  # the lm_head: reads the table transposed, as a tied export does
                read = ir.node("Transpose", [table], attributes={"perm": [1, 0]},
                               outputs=[ir.Value(name=f"{name}.transposed", shape=weight.shape,
                                                 type=weight.type)])
                graph.insert_before(next(iter(weight.uses())).node, read)
                ir.convenience.replace_all_uses_with(weight, read.outputs[0])
            graph.initializers.pop(weight.name)
            done += 1
        return done
