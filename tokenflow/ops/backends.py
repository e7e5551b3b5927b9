"""Backend registry for `tokenflow.ops` (the shape of xformers' fmha dispatch).

A backend is an object with a `name`, a tuple `ops` of the operations it implements, and
`why_not(op, **inputs) -> str | None`, which returns the reason it cannot run the given inputs (or
None when it can), plus one method per operation with the public signature. Backends live in their
own modules, listed in `_MODULES`, and register themselves with `register()` when imported; a
module that fails to import (a missing optional dependency, an unbuilt extension) just leaves its
backend out, and `why_unavailable()` reports why.
"""
from __future__ import annotations

import importlib
import os

from tokenflow.ops import selfcheck

# Priority order for `auto`: the first backend whose `why_not` returns None runs the operation.
_MODULES = {
    "cuda": "tokenflow.ops.backend_cuda",
    "triton": "tokenflow.ops.backend_triton",
    "cpu": "tokenflow.ops.backend_cpu",
    "faiss": "tokenflow.ops.backend_faiss",
    "torch": "tokenflow.ops.backend_torch",
}
ENV_VAR = "TOKENFLOW_BACKEND"

_registry: dict[str, object] = {}
_import_errors: dict[str, str] = {}
_loaded = False
_forced: str | None = None


class Backend:
    """Optional base class: `_require` turns `why_not`'s reason into the ValueError a direct call raises."""

    name = "?"

    def why_not(self, op, **inputs):
        return None

    def _require(self, op, **inputs):
        reason = self.why_not(op, **inputs)
        if reason:
            raise ValueError(f"tokenflow.ops.{op} ({self.name} backend): {reason}")


def register(backend) -> None:
    _registry[backend.name] = backend


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, module in _MODULES.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # an optional backend that cannot load is reported, never fatal
            _import_errors[name] = f"{type(e).__name__}: {e}"


def known() -> list[str]:
    """Every backend name `choose` accepts: the shipped ones and any registered from outside."""
    return ["auto", *_MODULES, *[n for n in _registry if n not in _MODULES]]


def available() -> list[str]:
    """Names of the backends that loaded, in `auto` priority order."""
    _load()
    return [n for n in _MODULES if n in _registry]


def why_unavailable(name: str) -> str | None:
    _load()
    if name in _registry:
        return None
    if name not in _MODULES:
        return f"unknown backend {name!r}; choose one of {', '.join(known())}"
    return _import_errors.get(name, "not loaded")


def set_backend(name: str | None) -> None:
    """Force one backend for every call (None or 'auto' restores automatic choice)."""
    global _forced
    if name not in (None, "auto"):
        reason = why_unavailable(name)
        if reason:
            raise ValueError(f"backend {name!r} is unavailable: {reason}")
    _forced = None if name == "auto" else name


def get(name: str):
    reason = why_unavailable(name)
    if reason:
        raise ValueError(f"tokenflow.ops backend {name!r} is unavailable: {reason}")
    return _registry[name]


def choose(op: str, backend: str | None, **inputs):
    """The backend that runs `op`: the argument, else `set_backend`, else $TOKENFLOW_BACKEND, else auto."""
    _load()
    name = backend or _forced or os.environ.get(ENV_VAR) or "auto"
    if name != "auto":
        b = get(name)
        if op not in b.ops:
            raise ValueError(f"backend {name!r} does not implement {op}; it implements {', '.join(b.ops)}")
        reason = b.why_not(op, **inputs)
        if reason:
            raise ValueError(f"backend {name!r} cannot run {op} on these inputs: {reason}")
        return b
    reasons = []
    for n in available():
        b = _registry[n]
        if op not in b.ops or getattr(b, "auto", True) is False:
            continue
        reason = b.why_not(op, **inputs)
        if reason is None and not selfcheck.verified(b, op, inputs):
            reason = "failed its first-use self-check against the reference on this device"
        if reason is None:
            return b
        reasons.append(f"{n}: {reason}")
    raise ValueError(f"no backend can run {op}: " + "; ".join(reasons))


def explain(op: str, **inputs) -> dict[str, str | None]:
    """For each known backend, None if it would accept the inputs, else the reason it would not."""
    _load()
    out = {}
    for n in _MODULES:
        if n not in _registry:
            out[n] = f"unavailable: {_import_errors.get(n, 'not loaded')}"
        elif op not in _registry[n].ops:
            out[n] = f"does not implement {op}"
        else:
            out[n] = _registry[n].why_not(op, **inputs)
    return out
