"""The Plan: what to do to a model, and for which budget, objective and workload (JSON)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tailor.core.errors import TailorError

SCHEMA_VERSION = 1
# attention: the FLOPs of attention itself (q·kᵀ and p·v), i.e. the density of the attention
OBJECTIVES = ("latency", "flops", "kv_memory", "attention")
WORKLOAD_KEYS = ("batch", "prompt_len", "gen_len")


def check_budget(budget: Any) -> float:
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise TailorError(f"budget must be a number in (0, 1], got {budget!r}") from None
    if math.isnan(b) or not 0.0 < b <= 1.0:
        raise TailorError(f"budget must be in (0, 1] (a fraction of the original cost), got {budget}")
    return b


@dataclass
class Plan:
    model_hash: str
    budget: float
    objective: str = "latency"
    workload: dict[str, int] = field(default_factory=lambda: {"batch": 1, "prompt_len": 1024, "gen_len": 0})
    target: str = "h100"
    rewrites: list[dict[str, Any]] = field(default_factory=list)   # chosen options, in order
    predicted: dict[str, float] = field(default_factory=dict)      # cost ratio per objective
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: Any, where: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise TailorError(f"{where}: a plan is a JSON object")
        version = data.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise TailorError(f"{where}: missing or invalid schema_version")
        if version > SCHEMA_VERSION:
            raise TailorError(f"{where}: plan schema {version} is newer than this tailor reads "
                              f"({SCHEMA_VERSION}); upgrade tailor")
        try:
            rewrites = data.get("rewrites", [])
            if not isinstance(rewrites, list) or not all(
                    isinstance(r, dict) and isinstance(r.get("pass"), str) and isinstance(r.get("layer"), int)
                    and isinstance(r.get("choice"), dict) for r in rewrites):
                raise ValueError("rewrites must be a list of {pass, layer, choice} objects")
            plan = cls(model_hash=str(data["model_hash"]), budget=check_budget(data["budget"]),
                       objective=str(data.get("objective", "latency")),
                       workload={str(k): int(v) for k, v in data.get("workload", {}).items()},
                       target=str(data.get("target", "h100")),
                       rewrites=rewrites,
                       predicted={str(k): float(v) for k, v in data.get("predicted", {}).items()},
                       schema_version=version)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise TailorError(f"{where}: malformed plan ({type(e).__name__}: {e})") from None
        if plan.objective not in OBJECTIVES:
            raise TailorError(f"{where}: unknown objective {plan.objective!r}")
        w = plan.workload
        if set(w) - set(WORKLOAD_KEYS) or w.get("batch", 1) < 1 or w.get("prompt_len", 1) < 1 or \
                w.get("gen_len", 0) < 0:
            raise TailorError(f"{where}: workload takes batch ≥ 1, prompt_len ≥ 1, gen_len ≥ 0; got {w}")
        return plan

    @classmethod
    def load(cls, path: Path) -> "Plan":
        try:
            return cls.from_json(json.loads(Path(path).read_text()), str(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TailorError(f"{path}: unreadable plan ({type(e).__name__})") from None
