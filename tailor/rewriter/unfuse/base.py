"""What an unfusing rule is: one onnxruntime contrib op, written back as standard ONNX ops."""
from __future__ import annotations

import abc

import numpy as np
import onnx_ir as ir

MICROSOFT = "com.microsoft"


class UnfuseRule(abc.ABC):
    """`check` says why a node cannot be written back (None: it can); `rewrite` records the
    standard ops on `tape` and returns the values that replace the node's outputs, in order
    (None for an output nothing reads)."""
    domain = MICROSOFT
    op_types: tuple[str, ...] = ()

    def check(self, node: ir.Node) -> str | None:
        return None

    @abc.abstractmethod
    def rewrite(self, tape: ir.tape.Tape, node: ir.Node) -> list[ir.Value | None]:
        """The replacing values, recorded on `tape`."""


def used(value: ir.Value | None) -> bool:
    """Whether anything reads `value` (a node, or the graph as an output)."""
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def given(node: ir.Node, i: int) -> ir.Value | None:
    """The node's i-th input, None where it is absent or left empty."""
    return node.inputs[i] if i < len(node.inputs) and node.inputs[i] is not None else None


def constant(tape: ir.tape.Tape, node: ir.Node, what: str, value, like: ir.Value | None) -> ir.Value:
    """An initializer named after `node`, in the element type of `like` (float32 where unknown)."""
    dtype = like.dtype if like is not None and like.dtype is not None else ir.DataType.FLOAT
    array = np.asarray(value, dtype=dtype.numpy() if dtype.is_floating_point() else None)
    return tape.initializer(ir.tensor(array, name=f"{node.name}_{what}"))


def add_bias(tape: ir.tape.Tape, x: ir.Value, bias: ir.Value | None) -> ir.Value:
    """x + bias, written as exporters write a linear's bias (so recognition finds the linear's)."""
    return x if bias is None else tape.op("Add", [x, bias])
