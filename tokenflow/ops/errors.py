"""The error `tokenflow.ops` raises when a backend that was asked for cannot run, in one line naming
where it was asked for, why it cannot, and the way out.

`BackendError` is a `ValueError`. Where the editor is installed it is also the editor's root error,
`tokenflow.errors.TokenFlowError`, so that its command line prints it as one line like every other bad
input; `tokenflow.ops` itself never needs the editor (the kernels install alone as tokenflow-ops).
"""
from __future__ import annotations

try:  # the editor's root error; tokenflow.errors imports nothing heavy (no torch)
    from tokenflow.errors import TokenFlowError as _Root
except ModuleNotFoundError as e:
    if e.name not in ("tokenflow.errors", "tokenflow"):
        raise

    class _Root(Exception):
        """Stands in for the editor's root error where only the kernels are installed."""


class BackendError(_Root, ValueError):
    """A backend that was asked for cannot run: unknown, unavailable here, or not on these inputs."""
