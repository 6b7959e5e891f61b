"""Exception types. Each maps to one process exit code (documented in README.md).

The library raises these; only `commands/` turns them into a one-line message and an exit code.
"""

EXIT_OK = 0
EXIT_RUNTIME = 1  # something failed while doing valid work (I/O, a model that would not load)
EXIT_USAGE = 2  # bad options or bad input: wrong file, wrong model space, unknown model name
EXIT_INTEGRITY = 3  # an artifact is corrupt: a digest mismatch, a truncated stream, a missing blob
EXIT_UNAVAILABLE = 4  # something must be fetched and cannot be: offline hub, pip download failed


class CelslmError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code = EXIT_RUNTIME


class UsageError(CelslmError):
    exit_code = EXIT_USAGE


class ModelSpaceMismatch(UsageError):
    """An artifact computed for one model was given to another."""


class NotFound(UsageError):
    """An artifact or tag that no tier holds (every tier answered)."""


class OutputExists(UsageError):
    """An output would replace something that exists (the command line says how to force it)."""


class TokenRequired(UsageError):
    """A server wants a bearer token (the command line says how to give one)."""


class IntegrityError(CelslmError):
    exit_code = EXIT_INTEGRITY


class UnavailableError(CelslmError):
    exit_code = EXIT_UNAVAILABLE


class InsufficientStorage(UnavailableError):
    """A store cannot take an artifact without losing it (serve-cache answers 507)."""


class Overloaded(UnavailableError):
    """A service refuses work now, to answer what it holds in time (the edge service answers 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s
