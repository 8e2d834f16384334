"""tailor: compile a transformer to cost at most a budget of the original, losing as little
quality as possible."""
from tailor.api import Compiled, compile, load
from tailor.errors import TailorError, UnrecognizedModel

__all__ = ["compile", "load", "Compiled", "TailorError", "UnrecognizedModel"]
__version__ = "0.1.0"
