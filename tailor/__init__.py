"""tailor: compile a transformer to cost at most a budget of the original, losing as little
quality as possible."""
from tailor.core.errors import TailorError, UnrecognizedModel


def __getattr__(name: str):
    # the API pulls in torch and transformers: loaded on first use, so that light modules (the
    # ONNX validation child, error handling) import quickly
    if name in ("compile", "load", "Compiled"):
        from tailor import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'tailor' has no attribute {name!r}")

__all__ = ["compile", "load", "Compiled", "TailorError", "UnrecognizedModel"]
__version__ = "0.1.0"
