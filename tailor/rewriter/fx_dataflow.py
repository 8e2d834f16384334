"""Dataflow over a torch.export ExportedProgram (aten-level FX graph)."""
from __future__ import annotations

import operator

import torch
import torch.fx

from tailor.rewriter import dataflow as df
from tailor.rewriter.dataflow import AttentionInfo, Dataflow, LinearInfo, ParamRef

# aten overload-packet name -> canonical op
_ATEN = {
    **dict.fromkeys(["view", "reshape", "_unsafe_view", "transpose", "permute", "unsqueeze",
                     "squeeze", "expand", "contiguous", "clone", "to", "_to_copy", "dropout",
                     "alias", "detach", "type_as", "t", "flatten", "unflatten", "lift_fresh_copy",
                     "_assert_tensor_metadata"], df.VIEW),
    "linear": df.LINEAR, "addmm": df.LINEAR,
    "matmul": df.MATMUL, "bmm": df.MATMUL, "mm": df.MATMUL,
    "scaled_dot_product_attention": df.ATTENTION,
    "softmax": df.SOFTMAX, "_softmax": df.SOFTMAX, "_safe_softmax": df.SOFTMAX,
    "add": df.ADD, "sub": df.SUB, "rsub": df.SUB, "mul": df.MUL, "div": df.DIV, "neg": df.NEG,
    "pow": df.POW, "sqrt": df.SQRT, "rsqrt": df.RSQRT, "reciprocal": df.RECIPROCAL,
    "mean": df.REDUCE_MEAN, "layer_norm": df.LAYER_NORM, "native_layer_norm": df.LAYER_NORM,
    "rms_norm": df.RMS_NORM, "embedding": df.GATHER,
    "split": df.SPLIT, "split_with_sizes": df.SPLIT, "chunk": df.SPLIT, "slice": df.SLICE,
    "cat": df.CONCAT, "cos": df.COS, "sin": df.SIN,
    "silu": df.SILU, "gelu": df.GELU, "relu": df.RELU, "tanh": df.TANH, "sigmoid": df.SIGMOID,
    "erf": df.ERF, "where": df.WHERE,
    "le": df.COMPARE, "lt": df.COMPARE, "ge": df.COMPARE, "gt": df.COMPARE,
    "tril": df.TRIANGLE, "triu": df.TRIANGLE,
}


def _packet_name(target) -> str | None:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None) if packet is not None else None


class FxDataflow(Dataflow):
    backend = "torch"

    def __init__(self, program: torch.export.ExportedProgram):
        self.program = program
        self.graph = program.graph
        sig = program.graph_signature
        self._params: dict[str, str] = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self._consts: dict[str, str] = dict(sig.inputs_to_lifted_tensor_constants)
        self._state = program.state_dict
        self.holds_values = not any(t.is_meta for t in self._state.values())
        self._constants = program.constants
        self._users: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for n in self.graph.nodes:
            for a in n.all_input_nodes:
                self._users.setdefault(a, []).append(n)
        self._nodes = [n for n in self.graph.nodes
                       if n.op == "call_function" and not self._is_select(n)]
        self._ops = {n: self._classify(n) for n in self._nodes}

    # -- classification ---------------------------------------------------------------------
    @staticmethod
    def _is_select(n: torch.fx.Node) -> bool:
        """getitem on a multi-output op: a value of that op, not an op of its own."""
        return n.op == "call_function" and n.target is operator.getitem

    def _classify(self, n: torch.fx.Node) -> str:
        name = _packet_name(n.target)
        kind = _ATEN.get(name, df.OTHER)
        if kind == df.MATMUL and len(n.args) >= 2 and self.param(n.args[1]) is not None:
            return df.LINEAR
        return kind

    # -- Dataflow interface -------------------------------------------------------------------
    def nodes(self):
        return self._nodes

    def op(self, node):
        return self._ops.get(node, df.OTHER)

    def inputs(self, node):
        return [a for a in _flat_args(node.args) if isinstance(a, torch.fx.Node)]

    def outputs(self, node):
        users = self._users.get(node, [])
        selects = [u for u in users if self._is_select(u)]
        return selects if selects else [node]

    def producer(self, value):
        if not isinstance(value, torch.fx.Node) or value.op != "call_function":
            return None
        if self._is_select(value):
            src = value.args[0]
            return src if isinstance(src, torch.fx.Node) and src.op == "call_function" else None
        return value

    def consumers(self, value):
        return [u for u in self._users.get(value, []) if u.op == "call_function"
                and not self._is_select(u)]

    def node_name(self, node):
        return node.name

    def param(self, value):
        if isinstance(value, torch.fx.Node) and value.op == "placeholder" and value.name in self._params:
            key = self._params[value.name]
            return ParamRef(key, tuple(int(s) for s in self._state[key].shape))
        return None

    def constant(self, value):
        if isinstance(value, torch.fx.Node) and value.op == "placeholder" and value.name in self._consts:
            return self._constants[self._consts[value.name]].detach().cpu().numpy()
        return None

    def scalar_operand(self, node):
        nums = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        return float(nums[0]) if len(nums) == 1 else None

    def shape(self, value):
        val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        return tuple(int(s) if isinstance(s, int) else None for s in val.shape)

    def graph_inputs(self):
        user = set(self.program.graph_signature.user_inputs)
        return {n.name: n for n in self.graph.nodes if n.op == "placeholder" and n.name in user}

    def graph_outputs(self):
        out = next(n for n in self.graph.nodes if n.op == "output")
        return [a for a in _flat_args(out.args) if isinstance(a, torch.fx.Node)]

    def linear(self, node):
        name = _packet_name(node.target)
        if name == "linear":
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bias_ref = self.param(bias) if bias is not None else None
            return LinearInfo(self.param(node.args[1]), bias_ref, "out_in")
        if name == "addmm":
            return LinearInfo(self.param(node.args[2]), self.param(node.args[0]), "in_out")
        return LinearInfo(self.param(node.args[1]), None, "in_out")  # matmul/mm by a weight

    def layer_norm_params(self, node):
        w = node.args[2] if len(node.args) > 2 else None
        b = node.args[3] if len(node.args) > 3 else None
        return (self.param(w) if w is not None else None, self.param(b) if b is not None else None)

    def attention(self, node):
        args = list(node.args)
        mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
        causal = bool(args[5] if len(args) > 5 else node.kwargs.get("is_causal", False))
        mask = mask if isinstance(mask, torch.fx.Node) else None
        return AttentionInfo(args[0], args[1], args[2], mask, causal)

    def split_range(self, node, value):
        name = _packet_name(node.target)
        in_shape = self.shape(node.args[0])
        if in_shape is None or in_shape[-1] is None:
            return None
        width, rank = in_shape[-1], len(in_shape)
        if name == "slice":
            dim = node.args[1] if len(node.args) > 1 else 0
            if dim not in (-1, rank - 1):
                return None
            start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
            stop = node.args[3] if len(node.args) > 3 and node.args[3] is not None else width
            return (max(0, start), min(width, stop), width)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim not in (-1, rank - 1) or not self._is_select(value):
            return None
        index = value.args[1]
        if name == "chunk":
            n = node.args[1]
            sizes = [-(-width // n)] * n
        elif name == "split" and isinstance(node.args[1], int):
            sizes = [node.args[1]] * (-(-width // node.args[1]))
        else:
            sizes = list(node.args[1])
        start = sum(sizes[:index])
        return (start, min(width, start + sizes[index]), width)

    def param_array(self, ref):
        return self._state[ref.name].detach().cpu().float().numpy()


def _flat_args(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat_args(a)
        else:
            yield a
