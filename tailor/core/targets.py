"""Targets the cost model prices for: vendor peaks, or a table measured on this machine by
`tailor calibrate-target` (tailor.runtime.target_table writes it; `load_target_file` reads it).

Vendor peaks overstate what small matrix products reach on a CPU (a 128 × 384 × 384 product runs
far below the peak of a 2048-wide one), so a measured table gives the roofline's compute time as
achieved FLOP/s by the product's FLOPs, interpolated in log space.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tailor.core.errors import TailorError


@dataclass(frozen=True)
class Target:
    name: str
    flops_per_s: float        # dense matmul peak at `bytes_per_element`
    bytes_per_s: float        # memory bandwidth
    bytes_per_element: int    # weights, activations and KV cache
    # measured (FLOPs of one product, achieved FLOP/s), sorted; empty: the peak for every size
    matmul_rates: tuple[tuple[float, float], ...] = ()
    # whether a torch model's attention patterns skip the keys they drop over the prompt: tailor's
    # Triton block-sparse prefill runs on GPUs; elsewhere they run as masked dense attention
    sparse_prefill: bool = False
    # measured (FLOPs of one product, achieved FLOP/s) of products on INT8 weights with dynamically
    # quantized activations, the activations' quantization included; empty: no INT8 figure (the
    # int8 pass offers nothing on this target)
    int8_rates: tuple[tuple[float, float], ...] = ()

    def compute_seconds(self, flops: float) -> float:
        """Time of `flops` of matrix work: at the peak, or at the rate measured for products of
        that size (log-log interpolation, clamped to the table's ends)."""
        if not self.matmul_rates or flops <= 0:
            return flops / self.flops_per_s
        return flops / _interpolated(self.matmul_rates, flops)

    def int8_compute_seconds(self, flops: float) -> float:
        """Time of `flops` of matrix work on INT8 weights (int8_rates, interpolated alike)."""
        if not self.int8_rates:
            raise ValueError(f"target {self.name} has no INT8 figure")
        return flops / _interpolated(self.int8_rates, flops) if flops > 0 else 0.0

    def override(self, flops_per_s: float | None = None, bytes_per_s: float | None = None) -> "Target":
        return replace(self, flops_per_s=flops_per_s or self.flops_per_s,
                       bytes_per_s=bytes_per_s or self.bytes_per_s)


def _interpolated(table: tuple[tuple[float, float], ...], flops: float) -> float:
    sizes, rates = zip(*table)
    return math.exp(np.interp(math.log(flops), np.log(sizes), np.log(rates)))


# Vendor peaks (dense bf16 tensor cores on GPUs; fp32 on the CPU, a 2-core development machine
# class, refined by measurement in the CPU back-end issue). None has an INT8 figure: INT8 is
# offered on a CPU table measured by `tailor calibrate-target` only (no GPU INT8 path yet).
TARGETS = {
    "cpu": Target("cpu", 1.0e11, 2.0e10, 4),
    "a100": Target("a100", 312e12, 2.0e12, 2, sparse_prefill=True),
    "h100": Target("h100", 989e12, 3.35e12, 2, sparse_prefill=True),
    "h200": Target("h200", 989e12, 4.8e12, 2, sparse_prefill=True),
}


def get_target(name: str) -> Target:
    """A built-in target, or a JSON table measured by `tailor calibrate-target` (a path)."""
    if name in TARGETS:
        return TARGETS[name]
    if name.endswith(".json"):
        return load_target_file(Path(name))
    raise TailorError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)} or a table "
                      f"from `tailor calibrate-target` (.json)")


def load_target_file(path: Path):
    """A Target from a JSON table written by measure_cpu (checked: it is user input)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TailorError(f"{path}: not a readable target table ({type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("kind") != "tailor-target":
        raise TailorError(f"{path}: not a target table (write one with `tailor calibrate-target -o FILE`)")
    try:
        rows = [(float(f), float(r)) for f, r in data["matmul"]]
        int8_rows = [(float(f), float(r)) for f, r in data.get("int8_matmul", [])]
        name, peak, bandwidth = str(data["name"]), float(data["flops_per_s"]), float(data["bytes_per_s"])
        element = int(data["bytes_per_element"])
    except (KeyError, TypeError, ValueError) as e:
        raise TailorError(f"{path}: malformed target table ({type(e).__name__}: {e})") from None
    values = [peak, bandwidth] + [v for row in rows + int8_rows for v in row]
    if not rows or not all(np.isfinite(v) and v > 0 for v in values) or element not in (1, 2, 4, 8):
        raise TailorError(f"{path}: target table values must be positive and finite")
    return Target(name, peak, bandwidth, element, matmul_rates=_envelope(rows),
                  int8_rates=_envelope(int8_rows) if int8_rows else ())


def _envelope(rows: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Rates by product size: products of one size but other shapes at their geometric mean, then
    the upper envelope: larger products run at least as fast on a CPU, and a dip in the table is
    timing noise (another process, a frequency change) that would steer the search (three runs
    on this machine gave refllama-16m at budget 0.5 plans measuring 0.60, 0.60 and 0.77)."""
    by_size: dict[float, list[float]] = {}
    for f, r in rows:
        by_size.setdefault(f, []).append(r)
    sizes = sorted(by_size)
    rates = np.maximum.accumulate([float(np.exp(np.mean(np.log(by_size[f])))) for f in sizes])
    return tuple(zip(sizes, (float(r) for r in rates)))
