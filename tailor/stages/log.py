"""Stage times and peak memory for the report and the CLI's progress lines."""
from __future__ import annotations

import contextlib
import time

from tailor.core.devices import PeakMemory


class StageLog:
    """Times pipeline stages and their peak memory (host RSS, GPU allocated). The CLI passes
    `status` (a spinner while a stage runs) and `on_done` (one line per finished stage)."""

    def __init__(self, on_done=None, status=None):
        self.times: dict[str, float] = {}
        self.memory: dict[str, dict[str, float | None]] = {}
        self.on_done = on_done
        self.status = status

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        meter = PeakMemory()
        with meter(), self.status(name) if self.status else contextlib.nullcontext():
            yield
        self.times[name] = round(time.perf_counter() - t0, 3)
        self.memory[name] = {"peak_host_gib": meter.host_gib, "peak_gpu_gib": meter.gpu_gib}
        if len(meter.gpu_gib_each) > 1:
            self.memory[name]["peak_gpu_gib_each"] = meter.gpu_gib_each
        if self.on_done:
            self.on_done(name, self.times[name], self.memory[name])

    def to_json(self) -> dict:
        """report.json's "stages": seconds and peak memory per stage."""
        return {name: {"seconds": secs, **self.memory.get(name, {})} for name, secs in self.times.items()}
