"""A backend-neutral view of a captured graph.

The recognition rules (rewriter/rules/) are written once against this interface; FxDataflow
(a torch.export program) and OnnxDataflow (an onnx_ir model) translate their own ops into the
small canonical vocabulary below. Values and nodes stay the backend's own objects (fx.Node,
ir.Value, ir.Node), so everything the rules find points straight back into the backend graph.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

# Canonical op kinds. Anything else is "other", which rules never walk through.
VIEW = "view"            # reshape/transpose/expand/cast/dropout/bias-add...: same data, new layout
LINEAR = "linear"        # activation @ weight (+ bias), weight a parameter
MATMUL = "matmul"        # two activations
ATTENTION = "attention"  # fused scaled-dot-product attention
SOFTMAX = "softmax"
ADD, SUB, MUL, DIV, NEG = "add", "sub", "mul", "div", "neg"
POW, SQRT, RSQRT, RECIPROCAL = "pow", "sqrt", "rsqrt", "reciprocal"
REDUCE_MEAN = "reduce_mean"
LAYER_NORM = "layer_norm"
RMS_NORM = "rms_norm"    # a fused RMSNorm op (ONNX RMSNormalization, aten.rms_norm)
GATHER = "gather"        # embedding lookup
SPLIT, SLICE, CONCAT = "split", "slice", "concat"
COS, SIN = "cos", "sin"
SILU, GELU, RELU, TANH, SIGMOID, ERF = "silu", "gelu", "relu", "tanh", "sigmoid", "erf"
WHERE = "where"
COMPARE = "compare"      # <, <=, >, >=: how causal masks are built
TRIANGLE = "triangle"    # tril/triu
OTHER = "other"

ACTIVATIONS = frozenset({SILU, GELU, RELU, TANH, SIGMOID, ERF})


@dataclass(frozen=True)
class ParamRef:
    """A weight tensor of the model: a state-dict key (torch) or an initializer name (ONNX)."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass(frozen=True)
class LinearInfo:
    weight: ParamRef
    bias: ParamRef | None
    # "out_in" (torch nn.Linear) or "in_out" (ONNX MatMul, GPT-2 Conv1D)
    layout: str

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] if self.layout == "out_in" else self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] if self.layout == "out_in" else self.weight.shape[1]


@dataclass(frozen=True)
class AttentionInfo:
    q: Any
    k: Any
    v: Any
    mask: Any | None
    is_causal: bool


class Dataflow(ABC):
    """What recognition needs to know about a graph. Subclasses fill in each method."""

    backend: str

    @abstractmethod
    def nodes(self) -> list[Any]:
        """All op nodes in topological order."""
        ...

    @abstractmethod
    def op(self, node) -> str:
        ...

    @abstractmethod
    def inputs(self, node) -> list[Any]:
        """Data inputs of a node (values; None for absent optional inputs)."""
        ...

    @abstractmethod
    def outputs(self, node) -> list[Any]:
        ...

    @abstractmethod
    def producer(self, value) -> Any | None:
        ...

    @abstractmethod
    def consumers(self, value) -> list[Any]:
        ...

    @abstractmethod
    def node_name(self, node) -> str:
        ...

    @abstractmethod
    def param(self, value) -> ParamRef | None:
        """The weight behind a value, if the value is a model parameter (not a small constant)."""
        ...

    @abstractmethod
    def constant(self, value) -> np.ndarray | None:
        """The value of a small constant (scalars, shapes), else None."""
        ...

    @abstractmethod
    def scalar_operand(self, node) -> float | None:
        """The constant scalar operand of a binary op (the 2 of x ** 2), else None."""
        ...

    @abstractmethod
    def shape(self, value) -> tuple[int | None, ...] | None:
        ...

    @abstractmethod
    def graph_inputs(self) -> dict[str, Any]:
        ...

    @abstractmethod
    def graph_outputs(self) -> list[Any]:
        ...

    @abstractmethod
    def linear(self, node) -> LinearInfo:
        ...

    @abstractmethod
    def layer_norm_params(self, node) -> tuple[ParamRef | None, ParamRef | None]:
        ...

    @abstractmethod
    def attention(self, node) -> AttentionInfo:
        ...

    @abstractmethod
    def split_range(self, node, value) -> tuple[int, int, int] | None:
        """For a split/slice producing `value` along the last axis: (start, stop, input width)."""
        ...

    # False where the weights are meta placeholders (a dispatched model's structure, traced from
    # its config): param_array then has nothing to read
    holds_values = True

    @abstractmethod
    def param_array(self, ref: ParamRef) -> np.ndarray:
        ...

    # ---- helpers shared by every backend -------------------------------------------------

    def data_inputs(self, node) -> list[Any]:
        """Inputs that are activations: neither parameters nor constants.

        Layout ops, slices and splits carry one tensor; their other inputs (shapes, starts)
        may be computed at run time but are not data, so only the first activation counts.
        """
        dynamic = [v for v in self.inputs(node)
                   if v is not None and self.param(v) is None and self.constant(v) is None]
        if self.op(node) in (VIEW, SLICE, SPLIT):
            return dynamic[:1]
        return dynamic

    def is_dynamic(self, value) -> bool:
        return value is not None and self.param(value) is None and self.constant(value) is None

    def output(self, node):
        outs = self.outputs(node)
        return outs[0] if outs else None

    def skip_views_back(self, value):
        """Follow a value back through layout-only ops to the op that computed the data."""
        while True:
            node = self.producer(value)
            if node is None or self.op(node) != VIEW:
                return value
            # a cast of a weight (w.float()) views the weight itself
            ins = self.data_inputs(node) or [i for i in self.inputs(node) if self.param(i)][:1]
            if len(ins) != 1:
                return value
            value = ins[0]

    def view_consumers(self, value) -> Iterable[tuple[Any, Any]]:
        """(consumer, the value it reads) for consumers of `value`, looking through views."""
        stack, seen = [value], set()
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            for c in self.consumers(v):
                if self.op(c) == VIEW and len(self.data_inputs(c)) == 1:
                    stack.extend(self.outputs(c))
                else:
                    yield c, v

    def same_value(self, a, b) -> bool:
        return self.skip_views_back(a) is self.skip_views_back(b)
