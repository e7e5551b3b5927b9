"""User-facing errors: a problem the user can fix, said in one line with the fix."""


class TokenFlowError(Exception):
    """Bad input or environment. The CLI prints the message alone and exits with code 2."""


class ModelNotFoundError(TokenFlowError):
    """A model id, directory or checkpoint could not be found (offline or missing)."""
