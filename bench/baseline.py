"""The reference implementation's compute pattern, as a `tokenflow.ops` backend for side-by-side timing.

Reproduces how the published TokenFlow code computes the two hot operations, so the
end-to-end benchmark measures our speedup against it at identical settings:
- extended attention: K copies of every keyframe's K/V (`repeat`), a Python loop over heads, the full
  [K*S, K*S] logits materialised and softmaxed;
- propagation: normalised copies of the features, the full [B*S, 2S] similarity matrix, index
  tensors repeated over the channels for `gather`, blend weights repeated to full size.
Registered as backend "baseline" (never chosen by `auto`). Results equal the reference's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenflow.ops.backends import Backend, register
from tokenflow.ops.capabilities import OPS, Capabilities


def _attention_per_head(q, k, v, heads, scale):
    """q [n, L, C], k/v [n, M, C] -> [n, L, C], one head at a time with materialised logits."""
    n, L, C = q.shape
    d = C // heads
    out = torch.empty_like(q)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        sim = torch.einsum("bid,bjd->bij", q[..., sl], k[..., sl]) * scale
        out[..., sl] = torch.einsum("bij,bjd->bid", sim.softmax(dim=-1), v[..., sl])
    return out


class BaselineBackend(Backend):
    name = "baseline"
    caps = Capabilities(ops=OPS, auto=False, auto_note="the published implementation's pattern, for benchmarks")

    def extended_attention(self, q, k, v, heads, *, shared_qk=False, scale=None):
        R, K, S, C = v.shape
        scale = (C // heads) ** -0.5 if scale is None else scale
        if shared_qk:  # the reference copies the source q/k into the other branches
            q, k = q.expand(R, -1, -1, -1).clone(), k.expand(R, -1, -1, -1).clone()
        out = torch.empty_like(v)
        out[0] = _attention_per_head(q[0], k[0], v[0], heads, scale)
        for r in range(1, R):
            kr = k[r].reshape(1, K * S, C).repeat(K, 1, 1)  # K copies of all keyframes' keys
            vr = v[r].reshape(1, K * S, C).repeat(K, 1, 1)
            out[r] = _attention_per_head(q[r], kr, vr, heads, scale)
        return out

    def cosine_argmax(self, x, key_feats, which):
        F_, S, C = x.shape
        idx = torch.zeros(F_, which.shape[1], S, dtype=torch.long, device=x.device)
        for j in range(which.shape[1]):
            for f in range(F_):
                kf = int(which[f, j])
                if kf >= 0:
                    sim = F.normalize(x[f], dim=-1) @ F.normalize(key_feats[kf], dim=-1).T
                    idx[f, j] = sim.argmax(dim=-1)
        return idx

    def propagate(self, x, key_feats, key_out, which, weights, residual=None):
        """One call per group of frames sharing candidates, as the reference's group pass."""
        R = key_out.shape[0]
        F_, S, C = x.shape
        out = torch.empty(R, F_, S, C, dtype=key_out.dtype, device=x.device)
        for cand in torch.unique(which, dim=0):
            frames = (which == cand).all(dim=1).nonzero().squeeze(1)
            kfs = [int(c) for c in cand if c >= 0]
            xf = F.normalize(x[frames].reshape(-1, C), dim=-1)
            keys = F.normalize(key_feats[kfs].reshape(-1, C), dim=-1)
            sim = xf @ keys.T  # [B*S, len(kfs)*S], materialised
            parts = sim.chunk(len(kfs), dim=1)
            acc = None
            for j, (kf, part) in enumerate(zip(kfs, parts)):
                idx = part.argmax(dim=-1).view(1, -1, 1).repeat(R, 1, C)  # index repeated over channels
                g = key_out[:, kf].gather(1, idx)  # [R, B*S, C]
                w = weights[frames, j].float().view(1, -1, 1, 1).repeat(R, 1, S, C)  # repeated to full size
                term = w * g.view(R, len(frames), S, C).float()
                acc = term if acc is None else acc + term
            if residual is not None:
                acc = acc + residual[:, frames].float()
            out[:, frames] = acc.to(out.dtype)
        return out


register(BaselineBackend())
