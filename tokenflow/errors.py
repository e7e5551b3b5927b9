"""User-facing errors: a problem the user can fix, said in one line with the fix."""
from __future__ import annotations


class TokenFlowError(Exception):
    """Bad input or environment. The CLI prints the message alone and exits with code 2.

    `key`: the EditConfig key the problem is about, if any. The engine speaks in config keys; the CLI adds
    the flag the user typed (`tokenflow.cli` maps keys to flags)."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


class ModelNotFoundError(TokenFlowError):
    """A model id, directory or checkpoint could not be found (offline or missing)."""
