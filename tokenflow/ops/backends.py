"""Backend registry for `tokenflow.ops` and the choice of a backend for each call.

A backend subclasses `Backend`: a `name`, `caps` (a `Capabilities`: what it runs, as data) and one
method per operation it implements, with the public signature. The methods get inputs that
`tokenflow.ops` has validated and `choose` has matched against `caps`: they do not check again.
Backends live in their own modules, listed in `_MODULES` in `auto` priority order, and register
themselves at import, whether or not they can run here; `unavailable()` says why one cannot (a missing
dependency, no usable device) and `available()` lists the others. A module that fails to import is left
out with the error as its reason.

Choice for one call, first match wins:
1. the call's `backend=` argument: that backend, which must implement the operation;
2. `use_backend(name)`, a context manager (a context variable: this block, this thread or task);
3. `set_backend(name)`, for the process;
4. the environment variable TOKENFLOW_BACKEND;
5. `auto`: of the backends that `auto` may pick here (`why_not_auto`), that accept the inputs and that
   passed their first-use self-check on CUDA inputs (selfcheck.py), the fastest, measured once per shape
   class (autotune.py); with TOKENFLOW_AUTOTUNE=0, the first of them in priority order.
A backend forced by 2-4 runs the operations it implements and leaves the others to `auto` (logged at
debug level once per operation). A forced backend that cannot run the inputs raises `BackendError`.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os

import torch

from tokenflow.ops import autotune, capabilities, native, selfcheck
from tokenflow.ops.capabilities import OPS, Capabilities
from tokenflow.ops.errors import BackendError

log = logging.getLogger("tokenflow")

_MODULES = {
    "cuda": "tokenflow.ops.backend_cuda",
    "triton": "tokenflow.ops.backend_triton",
    "cpu": "tokenflow.ops.backend_cpu",
    "faiss": "tokenflow.ops.backend_faiss",
    "torch": "tokenflow.ops.backend_torch",
}
ENV_VAR = "TOKENFLOW_BACKEND"

_registry: dict[str, "Backend"] = {}
_import_errors: dict[str, str] = {}
_unavailable: dict[str, str | None] = {}  # asked once per backend and process
_loaded = False
_process_choice: str | None = None
_scoped_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("tokenflow_backend", default=None)
_noted: set[tuple[str, str]] = set()
_USABLE = {"cpu": lambda: True, "cuda": torch.cuda.is_available}


class Backend:
    """Base class of a backend. Override `why_not` only for a rule that `Capabilities` cannot state."""

    name = "?"
    caps = Capabilities(ops=())

    @property
    def ops(self) -> tuple[str, ...]:
        return self.capabilities().ops

    def capabilities(self) -> Capabilities:
        """The declaration in force in this process (the triton backend has one for its interpreter)."""
        return self.caps

    def declarations(self) -> list[tuple[str, Capabilities]]:
        """(markdown label, caps) rows for docs/backend.md's table, whatever this machine has."""
        return [(f"`{self.name}`", self.caps)]

    def unavailable(self) -> str | None:
        """Why the backend cannot run in this process, or None. Default: none of its devices is usable."""
        caps = self.capabilities()
        if caps.devices and not any(_USABLE.get(d, lambda: True)() for d in caps.devices):
            note = f" ({caps.device_note})" if caps.device_note else ""
            return f"PyTorch sees no {capabilities.device_words(caps.devices)} device{note}"
        return None

    def why_not(self, op: str, **inputs) -> str | None:
        return capabilities.why_not(self.capabilities(), self.name, op, inputs)

    def why_not_auto(self, measured: bool = False) -> str | None:
        return capabilities.why_not_auto(self.capabilities(), measured)


def register(backend: Backend) -> None:
    _registry[backend.name] = backend
    _unavailable.pop(backend.name, None)


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
    native.warn_if_missing()


def known() -> list[str]:
    """Every backend name `choose` accepts: the shipped ones and any registered from outside."""
    return ["auto", *_MODULES, *[n for n in _registry if n not in _MODULES]]


def why_unavailable(name: str) -> str | None:
    """None if backend `name` can run in this process, else why not."""
    _load()
    if name not in _registry:
        if name not in _MODULES:
            return f"unknown backend {name!r}; choose one of {', '.join(known())}"
        return _import_errors.get(name, "not loaded")
    if name not in _unavailable:
        _unavailable[name] = _registry[name].unavailable()
    return _unavailable[name]


def available() -> list[str]:
    """Names of the shipped backends that can run in this process, in `auto` priority order."""
    _load()
    return [n for n in _MODULES if why_unavailable(n) is None]


def get(name: str) -> Backend:
    reason = why_unavailable(name)
    if reason:
        raise BackendError(f"tokenflow.ops backend {name!r} is unavailable: {reason}")
    return _registry[name]


def _checked_name(name: str | None) -> str | None:
    if name in (None, "auto"):
        return name
    reason = why_unavailable(name)
    if reason:
        raise BackendError(f"backend {name!r} is unavailable: {reason}")
    return name


def set_backend(name: str | None) -> None:
    """Force backend `name` for the operations it implements, in the whole process (None or 'auto'
    restores automatic choice). `use_backend` blocks and a call's `backend=` take precedence."""
    global _process_choice
    _process_choice = None if _checked_name(name) == "auto" else name


@contextlib.contextmanager
def use_backend(name: str | None):
    """`with use_backend("triton"): ...` forces a backend in this block (this thread or asyncio task)
    for the operations it implements; 'auto' chooses automatically there whatever `set_backend` says."""
    token = _scoped_choice.set(_checked_name(name) or "auto")
    try:
        yield
    finally:
        _scoped_choice.reset(token)


def forced() -> tuple[str, str] | None:
    """(name, where it was forced) for calls without `backend=`, or None for automatic choice."""
    scoped = _scoped_choice.get()
    if scoped is not None:
        return None if scoped == "auto" else (scoped, f"use_backend({scoped!r})")
    if _process_choice:
        return _process_choice, f"set_backend({_process_choice!r})"
    env = os.environ.get(ENV_VAR)
    if env and env != "auto":
        return env, f"{ENV_VAR}={env}"
    return None


def _named(op: str, name: str, source: str, inputs: dict) -> Backend:
    reason = why_unavailable(name)
    if reason:
        raise BackendError(f"{source} is unavailable: {reason}")
    b = _registry[name]
    reason = b.why_not(op, **inputs)
    if reason:
        raise BackendError(f"{source} cannot run {op} on these inputs: {reason}")
    return b


def _eligible(op: str, inputs: dict, measured: bool) -> tuple[list[Backend], list[str]]:
    """The backends auto may run `op` on `inputs` with, in priority order, and why the others are out."""
    ok, reasons = [], []
    for n in _MODULES:
        b = _registry.get(n)
        if b is None or op not in b.ops:
            continue
        # Data first: a CPU call never asks the CUDA driver whether the cuda backend could run.
        reason = b.why_not_auto(measured) or b.why_not(op, **inputs) or why_unavailable(n)
        if reason is None and not selfcheck.verified(b, op, inputs):
            reason = "failed its first-use self-check against the reference on this device"
        if reason is None:
            ok.append(b)
        else:
            reasons.append(f"{n}: {reason}")
    return ok, reasons


def _auto(op: str, inputs: dict) -> Backend:
    measured = autotune.enabled()
    ok, reasons = _eligible(op, inputs, measured)
    if not ok:
        raise BackendError(f"no backend can run {op}: " + "; ".join(reasons))
    if not measured or len(ok) == 1:
        return ok[0]
    return autotune.pick(op, ok, inputs)


def choose(op: str, backend: str | None, **inputs) -> Backend:
    """The backend that runs `op` on `inputs` (validated by `tokenflow.ops`); see the module docstring."""
    _load()
    if backend == "auto":
        return _auto(op, inputs)
    if backend is not None:
        b = _registry.get(backend)
        if b is not None and op not in b.ops:
            raise BackendError(f"backend {backend!r} does not implement {op}; it implements {', '.join(b.ops)}")
        return _named(op, backend, f"backend {backend!r}", inputs)
    choice = forced()
    if choice is not None:
        name, source = choice
        b = _registry.get(name)
        if b is None or op in b.ops:
            return _named(op, name, source, inputs)
        if (name, op) not in _noted:
            _noted.add((name, op))
            log.debug("tokenflow.ops: %s does not implement %s; choosing its backend automatically", source, op)
    return _auto(op, inputs)


def explain(op: str, *, auto: bool = False, **inputs) -> dict[str, str | None]:
    """For each known backend, None if it would run `op` on these inputs when asked by name, else why not;
    with `auto=True`, as `auto` sees them: also why it passes a backend over (e.g. faiss), and, once auto
    has measured this shape class, which backends it measured slower (with the times)."""
    _load()
    measured = autotune.enabled()
    record = autotune.record_for(op, inputs) if auto and measured else None
    out = {}
    for n in known()[1:]:
        reason = why_unavailable(n)
        if reason:
            out[n] = f"unavailable: {reason}"
            continue
        b = _registry[n]
        out[n] = (b.why_not_auto(measured) if auto else None) or b.why_not(op, **inputs)
        if out[n] is None and record and n != record["backend"] and n in record["seconds"]:
            secs = record["seconds"]
            out[n] = (f"measured slower here: {secs[n] * 1e3:.3g} ms against {record['backend']}'s "
                      f"{secs[record['backend']] * 1e3:.3g} ms ({record['date']})")
    return out


def resolve_forced(name: str | None, device, dtype: torch.dtype, *, source: str | None = None) -> dict[str, str | None]:
    """op -> backend name (None: auto) for a caller that forces `name` on a model on `device` in `dtype`:
    `name` for every operation it implements, auto for the others. From the declared capabilities alone
    (no tensors): raises `BackendError`, naming `source` (default "backend 'NAME'"), if `name` is unknown,
    cannot run in this process, or cannot run one of its operations on that device and dtype."""
    if name in (None, "auto"):
        return dict.fromkeys(OPS)
    source = source or f"backend {name!r}"
    reason = why_unavailable(name)
    if reason:
        fix = "" if name not in _registry and name not in _MODULES else "; use another backend or auto"
        raise BackendError(f"{source}: {reason}{fix}")
    b = _registry[name]
    out = {}
    for op in OPS:
        out[op] = None
        if op in b.ops:
            reason = capabilities.why_not_here(b.capabilities(), name, op, torch.device(device), dtype)
            if reason:
                raise BackendError(f"{source} cannot run {op} here: {reason}; use another backend or auto")
            out[op] = name
    return out


def doc_table() -> str:
    """docs/backend.md's backend x op x device x dtype table, from every shipped backend's declaration."""
    _load()
    return capabilities.doc_table([d for n in _MODULES if n in _registry for d in _registry[n].declarations()])
