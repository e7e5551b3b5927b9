"""The native extension tokenflow._C (csrc/), loaded once for the `cpu` and `cuda` backends.

It is optional: an install without it (no pybind11, CMake or compiler at build time) runs the torch and
Triton backends. `MISSING` then says why, using the reason the build left beside the package
(`_C_not_built.txt`, written by packaging/tokenflow-ops/setup.py), and `warn_if_missing` says it once per
process, in one line, when the backends are first loaded.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("tokenflow")
NOT_BUILT = Path(__file__).resolve().parents[1] / "_C_not_built.txt"
REBUILD = "reinstall tokenflow-ops with `pip install -v` to see the build output (docs/build.md)"

try:
    from tokenflow import _C
    MISSING = REASON = None
except ImportError as e:
    _C = None
    try:
        recorded = NOT_BUILT.read_text().strip()
    except OSError:
        recorded = ""
    REASON = recorded or f"the native extension tokenflow._C does not load ({e})"
    MISSING = f"{REASON}; {REBUILD}"

_warned = False


def warn_if_missing() -> None:
    """One warning line per process when the extension is absent (the cpu and cuda backends are off)."""
    global _warned
    if MISSING and not _warned:
        _warned = True
        log.warning("tokenflow.ops: %s; the cpu and cuda backends are off (torch and triton run instead)", REASON)
