"""A first-use check of a fast backend on the GPU, against float64 truths, before `auto` trusts it.

CI has no GPU, so the GPU kernels are verified only in sessions that have one. To keep a kernel that is
wrong on some device, dtype or configuration from silently corrupting an edit, `auto` checks each
(backend, operation, device, variant) once per process before its first use. The variant is what picks
a kernel specialisation: the dtypes, C, heads, shared_qk, R, J, whether there is a residual, and the
size class of S. The check runs the backend on small random inputs built like the call's (`check_shape`):
the same variant at a small S that keeps S's size class and its remainder mod 16, so the same compiled
kernel runs (the propagate kernels switch to larger tiles at S >= 512; Triton specialises integers
divisible by 16). Results are held to the backend's own tolerances (accuracy.py), the ones the kernel
tests use. A backend that fails is skipped with a warning naming it; explicitly chosen backends are not
checked (the choice is the user's). CPU inputs are not checked: the tests run every CPU path.
"""
from __future__ import annotations

import logging

import torch

from tokenflow.ops import reference
from tokenflow.ops.accuracy import TOLERANCES, blend, check_indices, unambiguous_features

log = logging.getLogger("tokenflow")
_results: dict[tuple, str | None] = {}

# Sizes where a shipped kernel changes configuration: kernels/propagate.py pick_config takes
# GPU_CONFIGS["large"] from S = 512 on (tests/test_propagate.py checks the two agree).
LARGE_S = 512
SMALL_S = 64


def small_like(S: int, large_from: int | None = None) -> int:
    """A small S in the same configuration as S: S itself up to SMALL_S, else SMALL_S (LARGE_S from
    `large_from` on) plus S % 16."""
    if S <= SMALL_S:
        return S
    return (LARGE_S if large_from is not None and S >= large_from else SMALL_S) + S % 16


def check_shape(op: str, inputs: dict) -> tuple:
    """The variant of a call (see the module docstring) as a hashable key, which `_check` rebuilds."""
    if op == "extended_attention":
        v = inputs["v"]
        R, _, S, C = v.shape
        return (op, v.dtype, R, small_like(S), C, int(inputs["heads"]), bool(inputs.get("shared_qk")))
    x, which = inputs["x"], inputs["which"]
    key_out, residual = inputs.get("key_out"), inputs.get("residual")
    return (op, x.dtype, small_like(x.shape[1], LARGE_S), x.shape[2], which.shape[1],
            key_out.dtype if key_out is not None else None, key_out.shape[0] if key_out is not None else 0,
            residual.dtype if residual is not None else None)


def _tolerance(backend, op: str, dtype: torch.dtype):
    caps = getattr(backend, "capabilities", None)
    return caps().tolerance(op, dtype) if caps else TOLERANCES[op][dtype]


def _attention(backend, key, device, g) -> str | None:
    _, dtype, R, S, C, heads, shared = key
    K = 2
    q, k = (torch.randn(1 if shared else R, K, S, C, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(R, K, S, C, generator=g).to(device, dtype)
    got = backend.extended_attention(q, k, v, heads, shared_qk=shared, scale=None)
    truth = reference.extended_attention(q.double(), k.double(), v.double(), heads, shared_qk=shared)
    own = reference.extended_attention(q, k, v, heads, shared_qk=shared)  # PyTorch's error in this dtype
    return _tolerance(backend, "extended_attention", dtype).check(got, truth, ref=own)


def _search(backend, key, device, g) -> str | None:
    op, dtype, S, C, J, out_dtype, R, res_dtype = key
    F_, K = 3, 2
    x, key_feats = unambiguous_features(F_, K, S, C, g)  # the output check can use the reference's indices
    x, key_feats = x.to(device, dtype), key_feats.to(device, dtype)
    which = (torch.arange(F_)[:, None] + torch.arange(J)[None]) % K
    if J > 1:
        which[0, -1] = -1  # a frame without its last candidate (group 0 has no previous keyframe)
    which = which.to(device)
    if op == "cosine_argmax":
        got = backend.cosine_argmax(x, key_feats, which)
        return check_indices(x, key_feats, which, got, _tolerance(backend, op, dtype))
    key_out = torch.randn(R, K, S, C, generator=g).to(device, out_dtype)
    weights = torch.rand(F_, J, generator=g).to(device)
    residual = torch.randn(R, F_, S, C, generator=g).to(device, res_dtype) if res_dtype else None
    got = backend.propagate(x, key_feats, key_out, which, weights, residual)
    truth = blend(key_out, which, weights, residual, reference.cosine_argmax(x, key_feats, which))
    return _tolerance(backend, op, out_dtype).check(got, truth)


def check(backend, op: str, inputs: dict) -> str | None:
    """Run `backend`'s `op` once on small inputs of the same variant as `inputs`; None if it is right."""
    key = check_shape(op, inputs)
    device = next(t.device for t in inputs.values() if isinstance(t, torch.Tensor))
    g = torch.Generator().manual_seed(0)
    return (_attention if op == "extended_attention" else _search)(backend, key, device, g)


def verified(backend, op: str, inputs: dict) -> bool:
    t = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if t is None or t.device.type != "cuda" or backend.name == "torch":
        return True
    key = (backend.name, str(t.device), check_shape(op, inputs))
    if key not in _results:
        try:
            _results[key] = check(backend, op, inputs)
        except Exception as e:  # a crash in a kernel is a failed check, not a failed edit
            _results[key] = f"{type(e).__name__}: {e}"
        if _results[key]:
            log.warning("tokenflow.ops: backend %r failed its self-check for %s %s on %s (%s); skipping it",
                        backend.name, op, key[2][1:], t.device, _results[key])
    return _results[key] is None
