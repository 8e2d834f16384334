"""What every rewrite pass has in common: an Option is one thing a pass could do, a Pass the
object that offers, prices and applies them.

Options claim resources (e.g. "attn:3"); two options with a common claim exclude each other,
which is all the search needs to know to combine passes, but for a pass that `composes` (INT8 on
a part another option may also prune), whose pairs with other options the search prices jointly.
"""
from __future__ import annotations

import abc
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tailor.backends import BACKENDS
from tailor.backends.base import Backend
from tailor.rewriter.graph import Projection, TransformerGraph


def sliceable(graph: TransformerGraph, projections: list[Projection]) -> bool:
    """Whether these projections can be sliced: not column ranges of a fused weight (GPT-2's
    c_attn, Phi-3's qkv), and stored [out, in] unless the backend slices [in, out] (Conv1D)."""
    in_out = BACKENDS[graph.backend].slices_in_out_layout
    return all(p.columns is None and (in_out or p.layout == "out_in") for p in projections)


def edits_post_norm_branches(graph: TransformerGraph) -> bool:
    """Whether a post-norm block's branch can be replaced or rewired alone on this backend."""
    return BACKENDS[graph.backend].edits_post_norm_branches


@dataclass
class Option:
    pass_name: str
    layer: int                  # the block it changes; the number of blocks: the LM head after them
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


class Pass(abc.ABC):
    """One rewrite, written once for every backend:
        candidates(graph, signals)        what could be done here (signals rank heads etc.)
        from_plan(graph, layer, choice)   the option a plan.json names, checked against the graph
                                          (ValueError says what does not fit)
        reshape(option, shape)            its effect on the cost model's LayerShape
        apply(backend, options, signals)  do it, in the backend's edit vocabulary (signals None:
                                          shapes only, on reload or for a timing variant)
        check(backend, option)            can this model take it (a plan's option, before applying)
        first_layer(option)               the first layer whose computation it needs or changes
    """

    name: ClassVar[str]
    # option losses measured one run per option (False: the pass estimates them itself)
    measured: ClassVar[bool] = True
    # its options change how a part runs rather than its shape, and combine with other passes'
    # options on the same layer, whose joint cost is not the sum of theirs: the search prices
    # each such pair jointly (tailor.passes.search.pair_costs)
    composes: ClassVar[bool] = False
    # its options may name the LM head (Option.layer = the number of blocks)
    reaches_head: ClassVar[bool] = False

    @abc.abstractmethod
    def candidates(self, graph: TransformerGraph, signals) -> list[Option]:
        ...

    @abc.abstractmethod
    def from_plan(self, graph: TransformerGraph, layer: int, choice: dict) -> Option:
        ...

    @abc.abstractmethod
    def reshape(self, option: Option, shape) -> None:
        ...

    @abc.abstractmethod
    def apply(self, backend: Backend, options: list[Option], signals) -> None:
        ...

    def proxy(self, graph: TransformerGraph, option: Option, signals) -> float | None:
        """A cheap stand-in for the option's measured KL, from the profile's signals: the local
        error it causes, relative to the residual stream. Only its order matters (a monotone map
        fitted on measured options turns it into KL, one pass at a time); None: no proxy, the
        option is always measured."""
        return None

    def first_layer(self, option: Option) -> int:
        """The earliest layer the option changes or reads from while running: the layers before
        it behave as in the dense model (what option measurements replay)."""
        return option.layer

    def check(self, backend: Backend, option: Option) -> None:
        """ValueError where this backend's model cannot take the option (beyond what the graph
        says: from_plan's checks); a plan's options are checked before anything runs."""
