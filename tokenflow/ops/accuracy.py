"""What counts as a correct result: tolerances per operation and dtype (xformers' ERROR_ATOL/RTOL), the
float64 truths they are measured against, the checks that apply them, and inputs with a known answer.

One table and one set of checks for the kernel tests (tests/opcheck.py) and the first-use self-check
(selfcheck.py), so both hold a backend to the same bound. The table is every shipped backend's default;
a backend may declare its own (`Capabilities.tolerances`).

- `extended_attention`, `propagate`: |got - truth| <= atol + rtol * |truth| elementwise, against a
  float64 truth (float32 where the device has no float64 matmul), keyed by the result's dtype. A half
  precision result also passes when its largest error is at most twice PyTorch's own in that dtype
  against the same truth (flash-attention's rule): the bound then scales with what the dtype can do.
- `cosine_argmax`: how far below the best float64 cosine the chosen candidate may score (atol), keyed by
  the features' dtype: at a near-tie either index is right, since correct backends sum in different orders.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float = 0.0

    def check(self, got: torch.Tensor, truth: torch.Tensor, ref: torch.Tensor | None = None) -> str | None:
        """None if `got` is close enough to `truth`, else one line saying by how much it is not.
        `ref`: PyTorch's own result in got's dtype, for the twice-PyTorch's-error alternative."""
        if tuple(got.shape) != tuple(truth.shape):
            return f"shape {tuple(got.shape)} differs from the expected {tuple(truth.shape)}"
        got, truth = got.double().cpu(), truth.double().cpu()
        if got.numel() == 0:
            return None
        if not torch.isfinite(got).all():
            return "the result holds NaN or inf"
        err = (got - truth).abs()
        excess = err - (self.atol + self.rtol * truth.abs())
        if excess.max() <= 0:
            return None
        worst = err.max().item()
        if ref is not None and ref.dtype in (torch.float16, torch.bfloat16):
            ref_err = (ref.double().cpu() - truth).abs().max().item()
            if worst <= 2 * ref_err:
                return None
            own = f"; PyTorch's own {str(ref.dtype).replace('torch.', '')} error is {ref_err:.3g}"
        else:
            own = ""
        at = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        return (f"max abs error {worst:.3g} (at {at}: {got[at].item():.6g} vs {truth[at].item():.6g}) exceeds "
                f"atol {self.atol:g} + rtol {self.rtol:g} * |truth|{own}")


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Outputs: float32 accumulation (a few ulp of float32 at |x| ~ 1); half precision: one rounding to the
# output dtype (2^-11, 2^-8 relative) plus the rounded inputs' effect through a softmax or a blend.
# Search: float32 sums of C <= 1280 products stay below 1e-5 of a cosine; half-precision features are
# rounded before the search sees them (and again by the reference's float32 normalisation).
TOLERANCES: dict[str, dict[torch.dtype, Tolerance]] = {
    "extended_attention": {F32: Tolerance(1e-5, 1e-5), F16: Tolerance(3e-3, 3e-3), BF16: Tolerance(2e-2, 2e-2)},
    "propagate": {F32: Tolerance(1e-5, 1e-5), F16: Tolerance(4e-3, 4e-3), BF16: Tolerance(2e-2, 2e-2)},
    "cosine_argmax": {F32: Tolerance(1e-5), F16: Tolerance(2e-3), BF16: Tolerance(2e-3)},
}


def check_indices(x: torch.Tensor, key_feats: torch.Tensor, which: torch.Tensor, idx: torch.Tensor,
                  tol: Tolerance) -> str | None:
    """None if `idx` [F, J, S] is a correct `cosine_argmax` result, else what is wrong: int64, 0 where
    which is -1, in range, and each index reaching the best float64 cosine to within `tol.atol`."""
    F_, J = which.shape
    if idx.dtype != torch.int64 or tuple(idx.shape) != (F_, J, x.shape[1]):
        return f"indices are {idx.dtype} {tuple(idx.shape)}, expected int64 {(F_, J, x.shape[1])}"
    idx, which = idx.cpu(), which.cpu()
    none = (which < 0).unsqueeze(-1).expand_as(idx)
    if (idx[none] != 0).any():
        return "which = -1 must give index 0"
    if ((idx < 0) | (idx >= key_feats.shape[1])).any():
        return "an index is out of range"
    best, _ = best_similarity(x, key_feats, which)
    gap = (best - similarity(x, key_feats, which, idx))[~none]
    if gap.numel() and gap.max() > tol.atol:
        return f"an index reaches {gap.max():.3g} less cosine similarity than the best (tolerance {tol.atol:g})"
    return None


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


def blend(key_out, which, weights, residual, idx) -> torch.Tensor:
    """The propagate formula with the given indices, in float64 on the host: the truth for an output."""
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


def unambiguous_features(F: int, K: int, S: int, C: int, generator: torch.Generator):
    """(x [F, S, C], key_feats [K, S, C]) float32, where every query token is a near copy (noise 1e-2) of
    one candidate token of every keyframe: each nearest neighbour wins by a wide margin in any precision,
    so the reference's indices are the only right ones."""
    base = torch.randn(S, C, generator=generator)

    def copies(n):
        return torch.stack([base[torch.randperm(S, generator=generator)] for _ in range(n)]) \
            + 0.01 * torch.randn(n, S, C, generator=generator)
    return copies(F), copies(K)
