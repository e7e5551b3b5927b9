"""The `faiss` backend: the nearest-neighbour search with faiss (exact inner-product search over the
L2-normalised keyframe tokens), then the reference's gather and blend. Search only: no extended attention.

faiss-cpu searches float32 numpy arrays, so CUDA and half-precision inputs are copied to the host and
upcast. It is a baseline for the fused kernels and a drop-in for codebases that already use faiss:
`auto` never picks it (ask for it by name). Exact ties may resolve to either index. Unavailable (and the
registry says why) when faiss is not installed.
"""
from __future__ import annotations

import numpy as np
import torch

from tokenflow.ops import reference
from tokenflow.ops.backends import Backend, register
from tokenflow.ops.capabilities import Capabilities

try:
    import faiss
    MISSING = None
except ImportError as e:
    faiss = None
    MISSING = f"faiss does not import ({e}); install faiss-cpu (`pip install faiss-cpu`, or the extra tokenflow-ops[faiss])"


class FaissBackend(Backend):
    name = "faiss"
    caps = Capabilities(
        ops=("propagate", "cosine_argmax"), devices=("cpu", "cuda"),
        auto=False, auto_note="a baseline: the fused kernels and the reference are faster than its host round trip")

    def unavailable(self):
        return MISSING or super().unavailable()

    def cosine_argmax(self, x, key_feats, which):
        F_, S, C = x.shape
        idx = torch.zeros(F_, which.shape[1], S, dtype=torch.long)
        which_cpu = which.cpu()
        for kf in torch.unique(which_cpu).tolist():
            if kf < 0:
                continue
            cand = np.ascontiguousarray(key_feats[kf].detach().float().cpu().numpy())
            faiss.normalize_L2(cand)  # cosine = inner product with unit candidates; the query's norm is irrelevant
            index = faiss.IndexFlatIP(C)
            index.add(cand)
            f_idx, j_idx = (which_cpu == kf).nonzero(as_tuple=True)
            q = np.ascontiguousarray(x.detach()[f_idx.to(x.device)].float().cpu().numpy().reshape(-1, C))
            _, best = index.search(q, 1)
            idx[f_idx, j_idx] = torch.from_numpy(best[:, 0]).view(-1, S)
        return idx.to(x.device)

    def propagate(self, x, key_feats, key_out, which, weights, residual=None):
        idx = self.cosine_argmax(x, key_feats, which)
        return reference.gather_blend(key_out, which, weights, idx, residual)


register(FaissBackend())
