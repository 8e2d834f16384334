"""The feed-forward branch of a block: everything between the stream it reads and the residual
add that writes it back.

    gated (SwiGLU, GeGLU):  down(act(gate(x)) * up(x))
    mlp (GPT-2, BERT):      down(act(up(x)))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tailor.rewriter import dataflow as df
from tailor.rewriter.dataflow import Dataflow


@dataclass
class FFNSite:
    kind: str
    activation: str
    gate: Any | None     # linear nodes
    up: Any
    down: Any
    residual_add: Any    # the add that closes the block
    nodes: list[str]
    # for one fused gate_up linear (Phi-3): the output columns of each half
    gate_columns: tuple[int, int] | None = None
    up_columns: tuple[int, int] | None = None


class FFNRule:
    """Anchored on the stream value the FFN reads (found by block assembly)."""

    max_nodes = 400

    def match(self, g: Dataflow, stream, stop: set[int]) -> FFNSite | None:
        linears, ops, nodes = [], set(), []
        residual = None
        frontier, seen = [stream], set()
        while frontier and len(seen) < self.max_nodes:
            v = frontier.pop(0)
            for c in g.consumers(v):
                if id(c) in seen:
                    continue
                seen.add(id(c))
                ins = g.data_inputs(c)
                if g.op(c) == df.ADD and len(ins) == 2 and \
                        sum(g.same_value(i, stream) for i in ins) == 1:
                    residual = c  # stream + branch: the block's second residual add
                    continue
                if g.op(c) in (df.ATTENTION, df.SOFTMAX):
                    return None  # reached attention before the FFN closed: not this shape
                nodes.append(g.node_name(c))
                ops.add(g.op(c))
                if g.op(c) == df.LINEAR:
                    linears.append(c)
                frontier.extend(o for o in g.outputs(c) if id(o) not in stop)
        if residual is None or len(linears) < 2:
            return None
        down_src = [g.producer(g.skip_views_back(i)) for i in g.data_inputs(residual)]
        down = next((n for n in linears if n in down_src), None)
        inputs = [n for n in linears if n is not down]
        if down is None or len(inputs) not in (1, 2):
            return None
        activation = _activation(g, ops, nodes)
        if len(inputs) == 1:
            halves = _fused_halves(g, inputs[0])
            if halves is None:
                return FFNSite("mlp", activation, None, inputs[0], down, residual, nodes)
            (gate_cols, _), (up_cols, _) = halves
            return FFNSite("gated", activation, inputs[0], inputs[0], down, residual, nodes,
                           gate_cols, up_cols)
        gate = next((n for n in inputs if any(g.op(c) in df.ACTIVATIONS
                                              for c, _ in g.view_consumers(g.output(n)))), None)
        if gate is None:
            return None
        up = inputs[1] if gate is inputs[0] else inputs[0]
        return FFNSite("gated", activation, gate, up, down, residual, nodes)


def _fused_halves(g: Dataflow, linear):
    """A gate_up linear split in two along its output: ((gate columns, value), (up columns, value)),
    the gate being the half that goes through the activation."""
    parts = []
    for c, v in g.view_consumers(g.output(linear)):
        if g.op(c) in (df.SPLIT, df.SLICE):
            for out in g.outputs(c):
                r = g.split_range(c, out)
                if r is not None:
                    parts.append(((r[0], r[1]), out))
    if len(parts) != 2:
        return None
    gated = [p for p in parts if any(g.op(c) in df.ACTIVATIONS for c, _ in g.view_consumers(p[1]))]
    if len(gated) != 1:
        return None
    return gated[0], next(p for p in parts if p is not gated[0])


def _activation(g: Dataflow, ops: set[str], nodes) -> str:
    if df.SILU in ops:
        return "silu"
    if df.GELU in ops or df.ERF in ops:
        return "gelu"
    if df.TANH in ops and df.POW in ops:
        return "gelu_tanh"
    if df.SIGMOID in ops:
        return "silu"   # x * sigmoid(x), as exported
    if df.RELU in ops:
        return "relu"
    return "unknown"


RULE = FFNRule()
