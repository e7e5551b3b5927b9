"""A first-use check of a fast backend on the GPU, against the reference, before `auto` trusts it.

CI has no GPU, so the GPU kernels are verified only in sessions that have one. To keep a kernel that is
wrong on some device or dtype from silently corrupting an edit, `auto` runs each (backend, operation,
device, dtype) once on small random inputs with an unambiguous answer and compares with the `torch`
reference; a backend that fails is skipped, with a warning naming it. Explicitly chosen backends are
not checked (the choice is the user's).
"""
from __future__ import annotations

import logging

import torch

from tokenflow.ops import reference

log = logging.getLogger("tokenflow")
_results: dict[tuple, str | None] = {}


def _inputs_propagate(device, dtype, g):
    K, F_, S, C, R = 2, 3, 77, 64, 3
    # Every token is a permuted copy of one base set plus small noise, so each nearest neighbour is
    # unambiguous in any precision.
    base = torch.randn(S, C, generator=g)
    noisy = lambda n: torch.stack([base[torch.randperm(S, generator=g)] for _ in range(n)]) \
        + 0.01 * torch.randn(n, S, C, generator=g)  # noqa: E731
    key_feats, x = noisy(K).to(device, dtype), noisy(F_).to(device, dtype)
    key_out = torch.randn(R, K, S, C, generator=g).to(device, dtype)
    which = torch.tensor([[0, -1], [0, 1], [1, 0]], device=device)
    weights = torch.tensor([[1.0, 0.0], [0.7, 0.3], [0.6, 0.4]], device=device)
    return dict(x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights)


def _check(backend, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    g = torch.Generator().manual_seed(0)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    if op == "extended_attention":
        q, k, v = (torch.randn(3, 3, 77, 128, generator=g).to(device, dtype) for _ in range(3))
        got = backend.extended_attention(q, k, v, 2, shared_qk=False, scale=None)
        want = reference.extended_attention(q, k, v, 2)
    else:
        inp = _inputs_propagate(device, dtype, g)
        if op == "cosine_argmax":
            got = backend.cosine_argmax(inp["x"], inp["key_feats"], inp["which"])
            want = reference.cosine_argmax(inp["x"], inp["key_feats"], inp["which"])
            return None if torch.equal(got, want) else "nearest-neighbour indices differ from the reference"
        got = backend.propagate(**inp, residual=None)
        want = reference.propagate(**inp)
    try:
        torch.testing.assert_close(got.float(), want.float(), **tol)
    except AssertionError as e:
        return f"result differs from the reference: {str(e).splitlines()[0]}"
    return None


def verified(backend, op: str, inputs: dict) -> bool:
    t = next((v for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if t is None or t.device.type != "cuda" or backend.name == "torch":
        return True
    key = (backend.name, op, str(t.device), t.dtype)
    if key not in _results:
        try:
            _results[key] = _check(backend, op, t.device, t.dtype)
        except Exception as e:  # a crash in a kernel is a failed check, not a failed edit
            _results[key] = f"{type(e).__name__}: {e}"
        if _results[key]:
            log.warning("tokenflow.ops: backend %r failed its self-check for %s on %s %s (%s); skipping it",
                        backend.name, op, t.device, t.dtype, _results[key])
    return _results[key] is None
