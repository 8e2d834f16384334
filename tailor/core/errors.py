"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""
from __future__ import annotations


class TailorError(Exception):
    """Bad input or an impossible request: the message says what was wrong and what to do."""


class UnrecognizedModel(TailorError):
    """The graph is not a transformer tailor understands; the message says what was found."""


def first_line(e: BaseException | str) -> str:
    """What an error from a library says, as one line for a TailorError (its type where it says
    nothing)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__
