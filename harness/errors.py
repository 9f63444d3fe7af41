"""Errors the harness raises on purpose.

``UsageError`` is what a user caused (bad name, bad number, too little data); the CLI
prints its message on one line and exits with status 2, before anything is written.
"""


class PruneBenchError(Exception):
    """Base class of every error the harness raises deliberately."""


class UsageError(PruneBenchError):
    """Bad input from the user: unknown names, out-of-range values, conflicting options."""


class UnsupportedModelError(UsageError):
    """The model's architecture has no adapter."""


class NotEnoughDataError(UsageError):
    """The data source cannot supply the requested number of tokens."""


class NumericalError(PruneBenchError):
    """A non-finite loss, a singular matrix without fallback: never silently skipped."""
