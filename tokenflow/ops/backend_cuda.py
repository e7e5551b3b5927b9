"""The `cuda` backend: the tensor-core kernel of tokenflow._C (csrc/propagate_cuda.cu).

Runs `propagate` and `cosine_argmax` on CUDA tensors whose features (x, key_feats) are float16 or
bfloat16 (the MMA inputs), with C a multiple of 8; key_out may be float32, float16 or bfloat16 and the
residual is cast to key_out's dtype. Launched on PyTorch's current stream of the inputs' device, with its
scratch (K * S inverse norms) from PyTorch's caching allocator. Inputs are made contiguous (a copy only
when they are not) and 16-byte aligned (a copy only when a view starts mid-allocation).
Unavailable (and the registry says why) when the extension is missing or was built without CUDA, when
PyTorch sees no CUDA device, or when the device cannot run the kernels (`_C.cuda_runtime_status()`).
"""
from __future__ import annotations

import torch

from tokenflow.ops.backends import Backend, register
from tokenflow.ops.capabilities import Capabilities
from tokenflow.ops.native import _C
from tokenflow.ops.native import MISSING as _NOT_LOADED

MISSING = _NOT_LOADED or (None if _C.has_cuda() else (
    f"tokenflow._C was built without its CUDA kernels: {_C.build_info()['cuda_absent_reason']} "
    "(docs/build.md: TOKENFLOW_CUDA)"))

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dense(t: torch.Tensor) -> torch.Tensor:
    t = t if t.is_contiguous() else t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()  # 16-byte vector loads need an aligned start


class CudaBackend(Backend):
    name = "cuda"
    # The limits csrc/propagate_cuda.cu checks at its boundary: MAX_J, the grid's y dimension, 16-byte loads.
    caps = Capabilities(
        ops=("propagate", "cosine_argmax"), devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16), dtype_note="the tensor-core search's inputs",
        min_sm={torch.float16: (8, 0), torch.bfloat16: (8, 0)},
        channel_multiple=8, max_keyframes_per_frame=64, max_frames=65535, max_tokens=2**31 - 1)

    def unavailable(self):
        # The runtime status asks the driver: only once PyTorch has seen a device.
        return MISSING or super().unavailable() or _C.cuda_runtime_status() or None

    def _run(self, x, key_feats, which, key_out=None, weights=None, residual=None, want_idx=False):
        F_, S, C = x.shape
        K, J = key_feats.shape[0], which.shape[1]
        dev = x.device
        with torch.cuda.device(dev):
            x, key_feats = _dense(x), _dense(key_feats)
            which64 = _dense(which.to(torch.int64))
            workspace = torch.empty(max(K * S, 1), dtype=torch.float32, device=dev)
            idx = torch.empty(F_, J, S, dtype=torch.int64, device=dev) if want_idx else None
            out = res = w32 = None
            R = 0
            if key_out is not None:
                R = key_out.shape[0]
                key_out = _dense(key_out)
                w32 = _dense(weights.to(torch.float32))
                if residual is not None:
                    res = _dense(residual.to(key_out.dtype))
                out = torch.empty(R, F_, S, C, dtype=key_out.dtype, device=dev)
            stream = torch.cuda.current_stream(dev).cuda_stream
            _C.propagate_cuda(
                x.data_ptr(), key_feats.data_ptr(), key_out.data_ptr() if key_out is not None else 0,
                which64.data_ptr(), w32.data_ptr() if w32 is not None else 0,
                res.data_ptr() if res is not None else 0, out.data_ptr() if out is not None else 0,
                idx.data_ptr() if idx is not None else 0,
                F_, J, K, R, S, C, DTYPE_CODES[x.dtype],
                DTYPE_CODES[key_out.dtype] if key_out is not None else 0,
                DTYPE_CODES[key_out.dtype] if key_out is not None else 0,
                workspace.data_ptr(), stream)
        return idx if want_idx else out

    def cosine_argmax(self, x, key_feats, which):
        return self._run(x, key_feats, which, want_idx=True)

    def propagate(self, x, key_feats, key_out, which, weights, residual=None):
        return self._run(x, key_feats, which, key_out=key_out, weights=weights, residual=residual)


register(CudaBackend())
