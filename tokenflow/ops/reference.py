"""Plain-PyTorch reference implementations of the two hot operations.

These are the ground truth every fast backend is tested against, and the `torch` backend the engine
falls back to. They never materialise repeated K/V copies, and the nearest-neighbour search works in
row blocks so its memory stays bounded (at most `block_rows` x S similarities at a time).
Shapes use the symbols of `tokenflow.ops` (K, S, C, F, R, J); see it for the full contract.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of the similarity matrix computed at once: 4096 rows x 4096 candidates x 4 B = 64 MiB.
BLOCK_ROWS = 4096
# Query rows per SDPA call in the extended-attention reference (bounds the math backend's logits).
ATTN_BLOCK_QUERIES = 4096
NORM_EPS = 1e-12  # as torch.nn.functional.normalize


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # CPU half-precision matmuls are slow and less exact; on GPUs the native dtype keeps SDPA's fused kernels.
    return torch.float32 if t.device.type == "cpu" else t.dtype


def _sdpa_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [b, h, L, d], k [b, h, M, d], v [b, h, M, dv] -> [b, h, L, dv], queries in blocks."""
    outs = [F.scaled_dot_product_attention(q[:, :, i:i + ATTN_BLOCK_QUERIES], k, v, scale=scale)
            for i in range(0, q.shape[2], ATTN_BLOCK_QUERIES)]
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def extended_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                       shared_qk: bool = False, scale: float | None = None) -> torch.Tensor:
    R, K, S, C = v.shape
    d = C // heads
    scale = d ** -0.5 if scale is None else scale
    dt = _compute_dtype(v)

    def split(t):  # [K, S, C] -> [K, heads, S, d]
        return t.to(dt).reshape(t.shape[0], S, heads, d).transpose(1, 2)

    def merge(t):  # [K, heads, S, d] -> [K, S, C]
        return t.transpose(1, 2).reshape(t.shape[0], S, C)

    def flat(t):  # all keyframes of one branch as one sequence: [K, S, C] -> [1, heads, K*S, d]
        return t.to(dt).reshape(1, K * S, heads, d).transpose(1, 2)

    out = torch.empty(R, K, S, C, dtype=v.dtype, device=v.device)
    # Branch 0 (source): ordinary per-frame self-attention.
    out[0] = merge(_sdpa_blocked(split(q[0]), split(k[0]), split(v[0]), scale)).to(v.dtype)
    for r in range(1, R):
        qr, kr = (q[0], k[0]) if shared_qk else (q[r], k[r])
        o = _sdpa_blocked(flat(qr), flat(kr), flat(v[r]), scale)  # [1, heads, K*S, d]
        out[r] = o.transpose(1, 2).reshape(K, S, C).to(v.dtype)
    return out


def cosine_argmax(x: torch.Tensor, key_feats: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    F_, S, C = x.shape
    J = which.shape[1]
    Sk = key_feats.shape[1]
    dt = torch.float32
    idx = torch.zeros(F_, J, S, dtype=torch.long, device=x.device)
    for kf in torch.unique(which).tolist():
        if kf < 0:
            continue
        # The query's norm does not change an argmax over candidates: only the candidates are normalised.
        cand = key_feats[kf].to(dt)
        cand = cand / cand.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        f_idx, j_idx = (which == kf).nonzero(as_tuple=True)
        rows = x[f_idx].to(dt).reshape(-1, C)  # [n*S, C]
        best = torch.empty(rows.shape[0], dtype=torch.long, device=x.device)
        for i in range(0, rows.shape[0], BLOCK_ROWS):
            best[i:i + BLOCK_ROWS] = (rows[i:i + BLOCK_ROWS] @ cand.T).argmax(dim=-1)
        idx[f_idx, j_idx] = best.view(-1, S)
    assert Sk > 0
    return idx


def gather_blend(key_out: torch.Tensor, which: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """out[r, f, s] = residual + sum_j weights[f, j] * key_out[r, which[f, j], idx[f, j, s]], in float32."""
    R = key_out.shape[0]
    F_, J, S = idx.shape
    C = key_out.shape[-1]
    out = torch.empty(R, F_, S, C, dtype=key_out.dtype, device=key_out.device)
    w = weights.to(torch.float32)
    for f in range(F_):
        acc = residual[:, f].to(torch.float32) if residual is not None else torch.zeros(
            R, S, C, dtype=torch.float32, device=key_out.device)
        for j in range(J):
            kf = int(which[f, j])
            if kf < 0:
                continue
            acc = acc + w[f, j] * key_out[:, kf, idx[f, j]].to(torch.float32)
        out[:, f] = acc.to(key_out.dtype)
    return out


def propagate(x: torch.Tensor, key_feats: torch.Tensor, key_out: torch.Tensor, which: torch.Tensor,
              weights: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    return gather_blend(key_out, which, weights, cosine_argmax(x, key_feats, which), residual)
