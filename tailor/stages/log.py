"""Stage times for the report and the CLI's progress lines."""
from __future__ import annotations

import contextlib
import time


class StageLog:
    """Times pipeline stages. The CLI passes `status` (a spinner while a stage runs) and
    `on_done` (one line per finished stage)."""

    def __init__(self, on_done=None, status=None):
        self.times: dict[str, float] = {}
        self.on_done = on_done
        self.status = status

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        with self.status(name) if self.status else contextlib.nullcontext():
            yield
        self.times[name] = round(time.perf_counter() - t0, 3)
        if self.on_done:
            self.on_done(name, self.times[name])
