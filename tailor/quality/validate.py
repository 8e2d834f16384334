"""Validation lines in the Optimum style: ✓ shapes match, ✓ max abs diff ... ."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tailor.rewriter.onnx_check import checker_problem


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'✓' if self.ok else '✗'} {self.detail}"


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, atol: float) -> list[Check]:
    """Shapes and max abs difference of a written model against the one it must reproduce."""
    ref, got = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    checks = [Check("shapes", ref.shape == got.shape,
                    f"shapes match: {tuple(got.shape)}" if ref.shape == got.shape
                    else f"shapes differ: reference {tuple(ref.shape)}, result {tuple(got.shape)}")]
    if ref.shape != got.shape:
        return checks
    finite = bool(np.isfinite(got).all())
    diff = float(np.abs(ref - got).max()) if ref.size else 0.0
    if not finite:
        checks.append(Check("max_abs_diff", False, "result has NaN or inf values"))
    else:
        ok = diff <= atol
        checks.append(Check("max_abs_diff", ok,
                            f"max abs diff {diff:.3g} {'≤' if ok else '>'} {atol:g}"))
    return checks


def check_onnx(path: Path) -> Check:
    """The ONNX checker's verdict on a written model (with shape inference; onnxruntime's contrib
    ops pass, as the model's run in onnxruntime is checked beside)."""
    problem = checker_problem(str(path), full_check=True)
    if problem:
        return Check("onnx_checker", False, f"onnx checker: {problem[:200]}")
    return Check("onnx_checker", True, f"onnx checker: {path.name} is valid")


def as_json(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
