"""The kernel tests' toolkit: inputs with a known answer, float64 truths, and checks with each backend's
own tolerances (`tokenflow.ops.accuracy`, the table the first-use self-check uses too).

Nearest-neighbour indices are checked against the float64 truth, not against another backend's float32
result: two correct float32 searches may sum a dot product in different orders (tiles, SIMD lanes, the
host BLAS under Triton's interpreter), so at a near-tie either index is right. The check is therefore
"every index reaches the best float64 similarity to within the dtype's tolerance", which pins the index
wherever the best candidate leads by more than that. Exact ties are tested on features built so that
every score is exact in any summation order (`exact_features`), where the lowest index must win.
Outputs are checked in float64 against the formula applied to the backend's own indices (`blend`), so a
gather-blend bug cannot hide behind a search bug.
"""
from __future__ import annotations

import pytest
import torch

from tokenflow.ops import backends
from tokenflow.ops.accuracy import (TOLERANCES, Tolerance, best_similarity, blend, check_indices,  # noqa: F401
                                    similarity, unambiguous_features)


def tolerance(backend: str | None, op: str, dtype: torch.dtype) -> Tolerance:
    """Backend `backend`'s tolerance for `op` in `dtype` (the shared table for None)."""
    if backend is None:
        return TOLERANCES[op][dtype]
    return backends.get(backend).capabilities().tolerance(op, dtype)


def use(name: str, op: str, **inputs) -> None:
    """Skip the test unless backend `name` accepts these inputs."""
    reason = backends.explain(op, **inputs)[name]
    if reason:
        pytest.skip(f"{name}: {reason}")


def assert_close(got: torch.Tensor, truth: torch.Tensor, tol: Tolerance, ref: torch.Tensor | None = None) -> None:
    problem = tol.check(got, truth, ref=ref)
    assert problem is None, problem


def assert_indices(x, key_feats, which, got, tol: Tolerance) -> None:
    """`got` [F, J, S] is a correct cosine_argmax result (see the module docstring)."""
    problem = check_indices(x, key_feats, which, got, tol)
    assert problem is None, problem


def exact_features(n: int, S: int, C: int, generator: torch.Generator) -> torch.Tensor:
    """[n, S, C] float32 tokens, each with 16 entries of +-1 and zeros elsewhere (C >= 16).

    Every norm is 4, so a normalised entry is +-1/4 and every dot product or cosine is a multiple of 1/16
    below 16 in magnitude: exact in float16, bfloat16 and float32 whatever the summation order. Equal
    tokens therefore score exactly equal, anywhere in a tile or panel, on any hardware."""
    assert C >= 16
    out = torch.zeros(n * S, C)
    support = torch.rand(n * S, C, generator=generator).argsort(dim=1)[:, :16]
    signs = torch.randint(0, 2, (n * S, 16), generator=generator).float() * 2 - 1
    out.scatter_(1, support, signs)
    return out.view(n, S, C)


def propagate_inputs(F, K, S, C, J, R, dtype, seed=0, *, negative=False, none_rate=0.3, device="cpu",
                     unambiguous=False):
    """(x, key_feats, key_out, which, weights, residual) for `propagate`, random in `dtype` on `device`.
    `negative`: every cosine similarity is negative (a masked candidate scored 0 instead of -inf would
    win); `unambiguous`: every nearest neighbour wins by a wide margin (for tests whose subject is not the
    search); `none_rate`: the share of which entries that are -1."""
    g = torch.Generator().manual_seed(seed)
    if unambiguous:
        x, key_feats = unambiguous_features(F, K, S, C, g)
    else:
        x = torch.randn(F, S, C, generator=g)
        key_feats = torch.randn(K, S, C, generator=g)
    if negative:
        x, key_feats = -x.abs(), key_feats.abs()
    key_out = torch.randn(R, K, S, C, generator=g)
    residual = torch.randn(R, F, S, C, generator=g)
    which = torch.randint(0, K, (F, J), generator=g)
    which[torch.rand(F, J, generator=g) < none_rate] = -1
    weights = torch.rand(F, J, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(key_feats), cast(key_out), which.to(device), weights.to(device), cast(residual)


def attention_inputs(R, K, S, heads, d, dtype, shared, seed=0, device="cpu"):
    """(q, k, v) for `extended_attention`: q, k [1, K, S, C] with `shared` (Q/K injection), else [R, K, S, C]."""
    g = torch.Generator().manual_seed(seed)
    Rq = 1 if shared else R
    C = heads * d
    q = torch.randn(Rq, K, S, C, generator=g)
    k = torch.randn(Rq, K, S, C, generator=g)
    v = torch.randn(R, K, S, C, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def naive_attention(q, k, v, heads, shared_qk=False, scale=None):
    """Extended attention written out: explicit logits over the explicitly concatenated keys of all
    keyframes of a branch, an explicit softmax, in float64, one (branch, frame, head) at a time."""
    R, K, S, C = v.shape
    d = C // heads
    scale = d ** -0.5 if scale is None else scale
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    out = torch.empty(R, K, S, C, dtype=torch.float64)
    for r in range(R):
        qk_b = 0 if shared_qk else r
        for f in range(K):
            if r == 0:
                keys, vals = k[qk_b, f], v[r, f]                      # own frame: [S, C]
            else:
                keys = torch.cat([k[qk_b, g] for g in range(K)], 0)   # all keyframes of the branch: [K*S, C]
                vals = torch.cat([v[r, g] for g in range(K)], 0)
            for h in range(heads):
                cs = slice(h * d, (h + 1) * d)
                logits = q[qk_b, f][:, cs] @ keys[:, cs].T * scale
                p = torch.exp(logits - logits.max(-1, keepdim=True).values)
                p = p / p.sum(-1, keepdim=True)
                out[r, f][:, cs] = p @ vals[:, cs]
    return out
