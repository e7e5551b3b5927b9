"""TokenFlow: training-free text-driven video editing.

The Python API: `TokenFlowEditor` (build from a model, invert, edit) and `EditConfig` (every setting).
Kernels for other implementations: `tokenflow.ops`.
"""
__version__ = "0.1.0"

from tokenflow.config import EditConfig  # noqa: E402
from tokenflow.errors import TokenFlowError  # noqa: E402


def __getattr__(name):  # the editor pulls in diffusers: import it only when asked for
    if name in ("TokenFlowEditor", "EditResult", "Inversion"):
        from tokenflow import editor
        return getattr(editor, name)
    if name == "EditJob":
        from tokenflow.job import EditJob
        return EditJob
    raise AttributeError(name)


__all__ = ["EditConfig", "EditJob", "TokenFlowEditor", "TokenFlowError"]
