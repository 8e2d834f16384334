"""Backends: one per model format (tailor.backends.base.Backend)."""
from __future__ import annotations

from tailor.backends.base import Backend
from tailor.backends.onnx_backend import OnnxBackend
from tailor.backends.torch_backend import TorchBackend
from tailor.rewriter.capture import Captured, TorchSource

BACKENDS: dict[str, type[Backend]] = {b.format: b for b in (TorchBackend, OnnxBackend)}


def backend_for(captured: Captured) -> Backend:
    """The captured model in its backend (the model itself, not a copy)."""
    src = captured.source
    if isinstance(src, TorchSource):
        return TorchBackend(src.module, captured.graph)
    # a lossless clean-up changed the model: what is measured and written is the cleaned graph
    return OnnxBackend(src.model, captured.graph, src, edited=bool(src.cleaned))
