"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class TailorError(Exception):
    """Bad input or an impossible request: the message says what was wrong and what to do."""


class UnrecognizedModel(TailorError):
    """The graph is not a transformer tailor understands; the message says what was found."""
