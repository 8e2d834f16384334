"""What every rewrite pass has in common: an Option is one thing a pass could do.

A pass is a module with
    NAME
    candidates(graph, signals) -> list[Option]     what could be done (signals rank heads etc.)
    reshape(option, LayerShape)                    its effect on the cost model's Structure
    apply_torch(model, graph, options, signals)    do it (signals None: shapes only, on reload)
    apply_onnx(model, graph, options, signals)     do it on an onnx_ir model (optional)
    from_plan(graph, layer, choice) -> Option      the option a plan.json names, checked against
                                                   the graph (ValueError says what does not fit)
Options claim resources (e.g. "attn:3"); two options with a common claim exclude each other,
which is all the search needs to know to combine passes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tailor.rewriter.graph import Projection, TransformerGraph


def sliceable(graph: TransformerGraph, projections: list[Projection]) -> bool:
    """Whether these projections can be sliced: not column ranges of a fused weight (GPT-2's
    c_attn, Phi-3's qkv) and, on torch, nn.Linear weights (not Conv1D's transposed layout)."""
    return all(p.columns is None and (graph.backend == "onnx" or p.layout == "out_in") for p in projections)


@dataclass
class Option:
    pass_name: str
    layer: int
    choice: dict[str, Any]
    claims: tuple[str, ...]
    cost: dict[str, float] = field(default_factory=dict)   # change per objective (< 0: saves)
    loss: float = 0.0                                      # estimated KL to the dense model
    label: str = ""

    @property
    def key(self) -> str:
        return f"{self.pass_name}:{self.layer}:{json.dumps(self.choice, sort_keys=True)}"

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "layer": self.layer, "choice": self.choice,
                "label": self.label, "estimated_kl": self.loss, "cost_delta": self.cost}


def sorted_indices(value: Any, bound: int, what: str) -> list[int]:
    """A plan's list of kept indices: distinct whole numbers in [0, bound), ascending."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{what} must be a list of whole numbers")
    if value != sorted(set(value)) or (value and not 0 <= value[0] <= value[-1] < bound):
        raise ValueError(f"{what} must be distinct, ascending and within 0..{bound - 1}")
    return value


def exact_keys(choice: dict, keys: set[str]) -> None:
    if set(choice) != keys:
        raise ValueError(f"choice must have exactly the keys {sorted(keys)}, got {sorted(choice)}")
