"""What every rewrite pass has in common: an Option is one thing a pass could do.

A pass is a module with
    NAME
    candidates(graph, signals) -> list[Option]     what could be done (signals rank heads etc.)
    reshape(option, LayerShape)                    its effect on the cost model's Structure
    apply_torch(model, graph, options, signals)    do it (signals None: shapes only, on reload)
    apply_onnx(model, graph, options, signals)     do it on an onnx_ir model (optional)
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

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Option":
        return cls(d["pass"], int(d["layer"]), dict(d["choice"]), (), dict(d.get("cost_delta", {})),
                   float(d.get("estimated_kl", 0.0)), str(d.get("label", "")))
