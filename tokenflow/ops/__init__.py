"""The two hot operations of TokenFlow, on plain tensors, behind one dispatch layer.

Symbols: K keyframes, S tokens per frame, C = heads * d channels, F frames to fill, R branches (3 in the
editor: source, uncond, cond), J candidate keyframes per frame (2 in TokenFlow: the frame's own group
keyframe and the previous group's).

Backends: `torch` (the reference), `triton`, `cuda`, `cpu` (the C++ extension) and `faiss` (search
only), each declaring what it runs (`tokenflow.ops.capabilities`). `backend=None` uses
`use_backend(...)` in a block, else `set_backend(...)`, else the environment variable TOKENFLOW_BACKEND
(each for the operations that backend implements), else `auto`: the fastest of the backends that may
and can run the inputs, measured once per shape class and device (TOKENFLOW_AUTOTUNE=0: the first in
priority order); `explain(op, **inputs)` says why each one would or would not run.

Inputs are validated here, once per call, with the offending shapes named, before any backend runs;
backends do not check again. The one check that reads tensor values (`which` in [-1, K - 1]) would
cost a device sync per call on a GPU, so it runs on CPU tensors always and on others only with
`set_checks(True)` or TOKENFLOW_OPS_CHECKS=1 (out-of-range indices on a GPU are undefined behaviour
otherwise).
"""
from __future__ import annotations

import os

import torch

from tokenflow.ops import backends
from tokenflow.ops.backends import BackendError, available, explain, set_backend, use_backend

__version__ = "0.1.0"  # the tokenflow-ops distribution (packaging/tokenflow-ops/pyproject.toml)

__all__ = ["extended_attention", "propagate", "cosine_argmax", "set_backend", "use_backend", "available",
           "explain", "set_checks", "BackendError"]

CHECKS_ENV = "TOKENFLOW_OPS_CHECKS"
_checks: bool | None = None


def set_checks(enabled: bool | None) -> None:
    """Check `which`'s values on every device (a device sync per call): True, False, or None to follow
    the environment variable TOKENFLOW_OPS_CHECKS (on when it is 1)."""
    global _checks
    _checks = enabled


def reads_values(device: torch.device) -> bool:
    """Whether validation reads tensor values on `device`: on the host always (no sync), on an
    accelerator only when checks are on (`set_checks`, TOKENFLOW_OPS_CHECKS=1), never on meta (no values)."""
    if device.type in ("cpu", "meta"):
        return device.type == "cpu"
    return _checks if _checks is not None else os.environ.get(CHECKS_ENV, "0") == "1"


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _fail(op: str, msg: str):
    raise ValueError(f"tokenflow.ops.{op}: {msg}")


def _check_float(op, **tensors):
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            _fail(op, f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")


def _check_same_device(op, **tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        _fail(op, "inputs are on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_extended_attention(q, k, v, heads, shared_qk):
    op = "extended_attention"
    _check_float(op, q=q, k=k, v=v)
    _check_same_device(op, q=q, k=k, v=v)
    if v.dim() != 4:
        _fail(op, f"v must be [R, K, S, C], got shape {tuple(v.shape)}")
    R, K, S, C = v.shape
    Rq = 1 if shared_qk else R
    for name, t in (("q", q), ("k", k)):
        if tuple(t.shape) != (Rq, K, S, C):
            _fail(op, f"{name} has shape {tuple(t.shape)}, expected {(Rq, K, S, C)} "
                      f"({'[1, K, S, C] with shared_qk' if shared_qk else '[R, K, S, C] like v'}; v is {tuple(v.shape)})")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(op, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if heads < 1 or C % heads:
        _fail(op, f"C = {C} channels do not split into heads = {heads}")
    if min(R, K, S) < 1:
        _fail(op, f"empty input: v has shape {tuple(v.shape)}")


def check_cosine_argmax(x, key_feats, which):
    op = "cosine_argmax"
    _check_float(op, x=x, key_feats=key_feats)
    _check_same_device(op, x=x, key_feats=key_feats, which=which)
    if x.dim() != 3 or key_feats.dim() != 3:
        _fail(op, f"x must be [F, S, C] and key_feats [K, S, C]; got {tuple(x.shape)} and {tuple(key_feats.shape)}")
    if x.shape[1:] != key_feats.shape[1:]:
        _fail(op, f"x {tuple(x.shape)} and key_feats {tuple(key_feats.shape)} differ in [S, C]")
    if x.dtype != key_feats.dtype:
        _fail(op, f"x is {x.dtype} but key_feats is {key_feats.dtype}")
    if which.dtype not in (torch.int32, torch.int64) or which.dim() != 2 or which.shape[0] != x.shape[0]:
        _fail(op, f"which must be an integer [F, J] tensor with F = {x.shape[0]}; got {which.dtype} {tuple(which.shape)}")
    if which.numel() and reads_values(which.device):
        lo, hi = int(which.min()), int(which.max())
        if lo < -1 or hi >= key_feats.shape[0]:
            _fail(op, f"which holds keyframe indices in [{lo}, {hi}], outside [-1, {key_feats.shape[0] - 1}]")


def check_propagate(x, key_feats, key_out, which, weights, residual):
    op = "propagate"
    check_cosine_argmax(x, key_feats, which)
    _check_float(op, key_out=key_out, weights=weights)
    _check_same_device(op, x=x, key_out=key_out, weights=weights, residual=residual)
    F_, S, C = x.shape
    if key_out.dim() != 4 or key_out.shape[1:] != key_feats.shape:
        _fail(op, f"key_out must be [R, K, S, C] with [K, S, C] = {tuple(key_feats.shape)}; got {tuple(key_out.shape)}")
    if tuple(weights.shape) != tuple(which.shape):
        _fail(op, f"weights {tuple(weights.shape)} must match which {tuple(which.shape)}")
    if residual is not None:
        _check_float(op, residual=residual)
        if tuple(residual.shape) != (key_out.shape[0], F_, S, C):
            _fail(op, f"residual has shape {tuple(residual.shape)}, expected {(key_out.shape[0], F_, S, C)}")


def _registered_op(t: torch.Tensor, check) -> bool:
    """Validate (unless tracing), then say whether to call the registered operator instead of a backend:
    under torch.compile (one opaque graph node, no graph break; validation reads values Dynamo cannot
    trace), and for meta tensors, whose fake implementation allocates just the output as the fused
    backends do (tokenflow.memsim simulates the editing loop's GPU memory that way)."""
    if torch.compiler.is_compiling():
        return True
    check()
    return t.device.type == "meta"


def extended_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                       shared_qk: bool = False, scale: float | None = None,
                       backend: str | None = None) -> torch.Tensor:
    """Self-attention of a keyframe pass, with TokenFlow's extended attention.

    v: [R, K, S, C], channels head-major (C = heads * d, as diffusers' `Attention` lays them out).
    q, k: [R, K, S, C], or [1, K, S, C] with `shared_qk`.
    Branch 0 (source) is ordinary self-attention within each frame (S keys). Every branch r >= 1
    attends, from each of its K frames, to the keys and values of all K frames of branch r (K*S keys).
    With `shared_qk` (Q/K injection), all branches use the source q and k: branches >= 1 share one
    probability matrix and differ only in v. softmax scale defaults to d ** -0.5.
    Returns [R, K, S, C] in v's dtype.
    """
    if _registered_op(v, lambda: check_extended_attention(q, k, v, heads, shared_qk)):
        return torch.ops.tokenflow.extended_attention(q, k, v, heads, shared_qk, scale, backend)
    b = backends.choose("extended_attention", backend, q=q, k=k, v=v, heads=heads, shared_qk=shared_qk)
    return b.extended_attention(q, k, v, heads, shared_qk=shared_qk, scale=scale)


def cosine_argmax(x: torch.Tensor, key_feats: torch.Tensor, which: torch.Tensor, *,
                  backend: str | None = None) -> torch.Tensor:
    """Cosine nearest neighbour of every token among the tokens of chosen keyframes.

    x: [F, S, C] query tokens; key_feats: [K, S, C] keyframe tokens; which: [F, J] int, the keyframes
    searched for each frame (-1 = none), each searched separately.
    Returns idx: [F, J, S] int64, idx[f, j, s] = argmax_t cos(x[f, s], key_feats[which[f, j], t]),
    ties to the lowest t (as torch.argmax); 0 where which is -1.
    """
    if _registered_op(x, lambda: check_cosine_argmax(x, key_feats, which)):
        return torch.ops.tokenflow.cosine_argmax(x, key_feats, which, backend)
    b = backends.choose("cosine_argmax", backend, x=x, key_feats=key_feats, which=which)
    return b.cosine_argmax(x, key_feats, which)


def propagate(x: torch.Tensor, key_feats: torch.Tensor, key_out: torch.Tensor, which: torch.Tensor,
              weights: torch.Tensor, residual: torch.Tensor | None = None, *,
              backend: str | None = None) -> torch.Tensor:
    """TokenFlow propagation: nearest-neighbour search, gather of keyframe outputs, blend.

    x: [F, S, C] source-branch features of the frames to fill (norm1 output in the editor);
    key_feats: [K, S, C] the keyframes' recorded source features; key_out: [R, K, S, C] the keyframes'
    recorded self-attention outputs for R branches; which: [F, J] int keyframe indices (-1 = none);
    weights: [F, J] blend weights; residual: optional [R, F, S, C] added to the result.
    With idx = cosine_argmax(x, key_feats, which), returns [R, F, S, C] in key_out's dtype:
        out[r, f, s] = residual[r, f, s] + sum_{j: which[f, j] >= 0} weights[f, j] * key_out[r, which[f, j], idx[f, j, s]]
    accumulated in float32. The [F*S, S] similarity matrix need not exist at once (backends tile it).
    """
    if _registered_op(x, lambda: check_propagate(x, key_feats, key_out, which, weights, residual)):
        return torch.ops.tokenflow.propagate(x, key_feats, key_out, which, weights, residual, backend)
    b = backends.choose("propagate", backend, x=x, key_feats=key_feats, key_out=key_out, which=which,
                        weights=weights, residual=residual)
    return b.propagate(x, key_feats, key_out, which, weights, residual)

from tokenflow.ops import library as _library  # noqa: E402,F401  (registers torch.ops.tokenflow.*)
