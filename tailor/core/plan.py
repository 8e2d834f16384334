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
        """A plan from untrusted JSON, its types checked strictly: a JSON boolean is not a number
        (in Python True == 1, so "layer": true would pass as layer 1 and slip past the conflict
        check of the rewrites, whose claims are strings like "attn:True"), and a whole number is
        not a float (2.0) or a string ("2")."""
        if not isinstance(data, dict):
            raise TailorError(f"{where}: a plan is a JSON object")
        if "schema_version" not in data:
            raise TailorError(f"{where}: missing schema_version")
        version = _whole(data["schema_version"], "schema_version", where)
        if version < 1:
            raise TailorError(f"{where}: invalid schema_version {version}")
        if version > SCHEMA_VERSION:
            raise TailorError(f"{where}: plan schema {version} is newer than this tailor reads "
                              f"({SCHEMA_VERSION}); upgrade tailor")
        for key in ("model_hash", "budget"):
            if key not in data:
                raise TailorError(f"{where}: malformed plan (missing {key})")
        model_hash = _string(data["model_hash"], "model_hash", where)
        budget = check_budget(_number(data["budget"], "budget", where))
        objective = _string(data.get("objective", "latency"), "objective", where)
        target = _string(data.get("target", "h100"), "target", where)
        workload = {_string(k, "a workload key", where): _whole(v, f"workload.{k}", where)
                    for k, v in _object(data.get("workload", {}), "workload", where).items()}
        predicted = {_string(k, "a predicted key", where): _number(v, f"predicted.{k}", where)
                     for k, v in _object(data.get("predicted", {}), "predicted", where).items()}
        rewrites = data.get("rewrites", [])
        if not isinstance(rewrites, list):
            raise TailorError(f"{where}: rewrites must be a list of {{pass, layer, choice}} objects, "
                              f"got {_shown(rewrites)}")
        for n, r in enumerate(rewrites):
            _object(r, f"rewrite {n}", where, article="must be an object {pass, layer, choice}")
            _string(r.get("pass"), f"rewrite {n}: pass", where)
            _whole(r.get("layer"), f"rewrite {n}: layer", where)
            _object(r.get("choice"), f"rewrite {n}: choice", where)
        plan = cls(model_hash=model_hash, budget=budget, objective=objective, workload=workload,
                   target=target, rewrites=rewrites, predicted=predicted, schema_version=version)
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


# ---- strict JSON types for Plan.from_json ------------------------------------------------------

def _shown(value: Any) -> str:
    """A value as the JSON had it (true, not True)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _whole(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TailorError(f"{where}: {what} must be a whole number (not true/false, 2.0 or \"2\"), "
                          f"got {_shown(value)}")
    return value


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TailorError(f"{where}: {what} must be a number (not true/false or a string), "
                          f"got {_shown(value)}")
    try:
        return float(value)
    except OverflowError:
        raise TailorError(f"{where}: {what} is out of range, got {_shown(value)}") from None


def _string(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise TailorError(f"{where}: {what} must be a string, got {_shown(value)}")
    return value


def _object(value: Any, what: str, where: str, article: str = "must be an object") -> dict:
    if not isinstance(value, dict):
        raise TailorError(f"{where}: {what} {article}, got {_shown(value)}")
    return value
