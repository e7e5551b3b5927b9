"""Opt-in windowed extended attention for very long videos (an approximation; the default is exact).

Exact extended attention costs O(K^2) in the number of keyframes K. Here keyframe i of branch r >= 1
attends only to the W keyframes nearest to it (a window of W consecutive keyframes around i) plus
`ANCHORS` keyframes spread evenly over the video, so the keyframe pass is linear in K. With W >= K
every keyframe sees every other one and the result equals the exact computation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenflow import ops

ANCHORS = 3


def window_of(i: int, K: int, W: int) -> list[int]:
    lo = min(max(0, i - W // 2), max(0, K - W))
    near = range(lo, min(K, lo + W))
    anchors = {round(a * (K - 1) / max(1, ANCHORS - 1)) for a in range(ANCHORS)} if K > W else set()
    return sorted(set(near) | anchors)


def windowed_extended_attention(q, k, v, heads: int, *, shared_qk: bool, scale: float, window: int,
                                backend: str | None = None) -> torch.Tensor:
    """Same contract as `tokenflow.ops.extended_attention`, with each keyframe's keys limited to its window."""
    R, K, S, C = v.shape
    if window >= K:
        return ops.extended_attention(q, k, v, heads, shared_qk=shared_qk, scale=scale, backend=backend)
    d = C // heads
    out = torch.empty_like(v)
    out[:1] = ops.extended_attention(q[:1], k[:1], v[:1], heads, scale=scale, backend=backend)  # source: per frame
    qr = (q[:1] if shared_qk else q[1:])  # [Rq, K, S, C]
    kr = (k[:1] if shared_qk else k[1:])
    vr = v[1:]

    def heads_first(t, frames):  # [n, f, S, C] -> [n, heads, f*S, d]
        n = t.shape[0]
        return t[:, frames].reshape(n, len(frames) * S, heads, d).transpose(1, 2)

    for i in range(K):
        sel = window_of(i, K, window)
        o = F.scaled_dot_product_attention(heads_first(qr, [i]), heads_first(kr, sel), heads_first(vr, sel), scale=scale)
        out[1:, i] = o.transpose(1, 2).reshape(R - 1, S, C)
    return out
