"""The kernel tests' shared toolkit: inputs with a known answer, float64 truths, and the index check.

Nearest-neighbour indices are checked against the float64 truth, not against another backend's float32
result: two correct float32 searches may sum a dot product in different orders (tiles, SIMD lanes, the
host BLAS under Triton's interpreter), so at a near-tie either index is right. The check is therefore
"every index reaches the best float64 similarity to within the dtype's tolerance", which pins the index
wherever the best candidate leads by more than that. Exact ties are tested on features built so that
every score is exact in any summation order (`exact_features`), where the lowest index must win.
"""
from __future__ import annotations

import torch

# How far below the float64 best similarity a backend's chosen candidate may score, by feature dtype:
# float32 accumulation of C products (C <= 640 here) stays below 1e-5; half-precision inputs round the
# features the search sees (and the reference's float32 normalisation rounds them again).
SEARCH_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


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


def unambiguous_features(F: int, K: int, S: int, C: int, generator: torch.Generator):
    """(x [F, S, C], key_feats [K, S, C]) where every query token is a near copy (noise 1e-2) of one
    candidate token of every keyframe: each nearest neighbour wins by a wide margin in any precision. For
    tests whose subject is not the search (launchers, epilogues, tracing)."""
    base = torch.randn(S, C, generator=generator)

    def copies(n):
        return torch.stack([base[torch.randperm(S, generator=generator)] for _ in range(n)]) \
            + 0.01 * torch.randn(n, S, C, generator=generator)
    return copies(F), copies(K)


def similarity(x, key_feats, which, idx) -> torch.Tensor:
    """cos(x[f, s], key_feats[which[f, j], idx[f, j, s]]) in float64, NaN where which is -1: [F, J, S]."""
    xs = torch.nn.functional.normalize(x.double().cpu(), dim=-1)
    ks = torch.nn.functional.normalize(key_feats.double().cpu(), dim=-1)
    idx, which = idx.cpu(), which.cpu()
    out = torch.full(idx.shape, float("nan"), dtype=torch.float64)
    for f in range(which.shape[0]):
        for j in range(which.shape[1]):
            kf = int(which[f, j])
            if kf >= 0:
                out[f, j] = (xs[f] * ks[kf][idx[f, j]]).sum(-1)
    return out


def best_similarity(x, key_feats, which) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 best cosine [F, J, S] (NaN where which is -1), its lowest-index argmax [F, J, S])."""
    xs = torch.nn.functional.normalize(x.double().cpu(), dim=-1)
    ks = torch.nn.functional.normalize(key_feats.double().cpu(), dim=-1)
    which = which.cpu()
    F_, J = which.shape
    best = torch.full((F_, J, x.shape[1]), float("nan"), dtype=torch.float64)
    arg = torch.zeros(F_, J, x.shape[1], dtype=torch.int64)
    for f in range(F_):
        for j in range(J):
            kf = int(which[f, j])
            if kf >= 0:
                best[f, j], arg[f, j] = (xs[f] @ ks[kf].T).max(dim=-1)  # max: first maximal index
    return best, arg


def assert_indices(x, key_feats, which, got, tol: float) -> None:
    """`got` [F, J, S] is a correct cosine_argmax result: int64, 0 where which is -1, in range, and each
    index reaches the float64 best similarity to within `tol` (see the module docstring)."""
    F_, J = which.shape
    assert got.dtype == torch.int64 and tuple(got.shape) == (F_, J, x.shape[1]), (got.dtype, tuple(got.shape))
    got, which = got.cpu(), which.cpu()
    none = (which < 0).unsqueeze(-1).expand_as(got)
    assert (got[none] == 0).all(), "which = -1 must give index 0"
    assert ((got >= 0) & (got < key_feats.shape[1])).all(), "an index is out of range"
    best, _ = best_similarity(x, key_feats, which)
    gap = (best - similarity(x, key_feats, which, got))[~none]
    assert gap.numel() == 0 or gap.max() <= tol, \
        f"an index reaches {gap.max():.3g} less similarity than the best (tolerance {tol:g})"


def blend(key_out, which, weights, residual, idx) -> torch.Tensor:
    """The propagate formula with the given indices, in float64: isolates the gather-blend from the search."""
    key_out, which, weights, idx = key_out.double().cpu(), which.cpu(), weights.double().cpu(), idx.cpu()
    R, F_, S = key_out.shape[0], which.shape[0], idx.shape[2]
    acc = residual.double().cpu().clone() if residual is not None else \
        torch.zeros(R, F_, S, key_out.shape[3], dtype=torch.float64)
    for f in range(F_):
        for j in range(which.shape[1]):
            kf = int(which[f, j])
            if kf >= 0:
                acc[:, f] += weights[f, j] * key_out[:, kf, idx[f, j]]
    return acc
