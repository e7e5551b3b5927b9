"""The `cuda` backend: the tensor-core kernel of tokenflow._C (csrc/propagate_cuda.cu).

Runs `propagate` and `cosine_argmax` on CUDA tensors whose features (x, key_feats) are float16 or
bfloat16 (the MMA inputs), with C a multiple of 8; key_out may be float32, float16 or bfloat16 and the
residual is cast to key_out's dtype. Launched on PyTorch's current stream of the inputs' device, with its
scratch (K * S inverse norms) from PyTorch's caching allocator. Inputs are made contiguous (a copy only
when they are not) and 16-byte aligned (a copy only when a view starts mid-allocation).
Import fails (and the registry says why) when the extension is missing or was built without CUDA.
"""
from __future__ import annotations

import torch

from tokenflow.ops.backends import Backend, register

try:
    from tokenflow import _C
except ImportError as e:
    raise ImportError(
        f"the native extension tokenflow._C is not built or does not load ({e}); reinstall with "
        "`pip install -v -e .` to see why (docs/build.md)") from e
if not _C.has_cuda():
    raise ImportError("tokenflow._C was built without its CUDA kernels: "
                      f"{_C.build_info()['cuda_absent_reason']} (docs/build.md: TOKENFLOW_CUDA)")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FEATURE_DTYPES = (torch.float16, torch.bfloat16)
MAX_J = 64  # csrc/propagate_cuda.cu: MAX_J


def _dense(t: torch.Tensor) -> torch.Tensor:
    t = t if t.is_contiguous() else t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()  # 16-byte vector loads need an aligned start


class CudaBackend(Backend):
    name = "cuda"
    ops = ("propagate", "cosine_argmax")

    def __init__(self):
        self._runtime_reason: str | None = None
        self._runtime_checked = False

    def _runtime(self) -> str | None:
        # Asked once: whether this process has a device the kernels can run on (driver, sm_80+).
        if not self._runtime_checked:
            self._runtime_checked = True
            if not torch.cuda.is_available():
                self._runtime_reason = "PyTorch sees no CUDA device"
            else:
                self._runtime_reason = _C.cuda_runtime_status() or None
        return self._runtime_reason

    def why_not(self, op, **inputs):
        if op not in self.ops:
            return f"does not implement {op}"
        for name, t in inputs.items():
            if isinstance(t, torch.Tensor) and t.device.type != "cuda":
                return f"{name} is on {t.device}; the cuda backend takes CUDA tensors"
        reason = self._runtime()
        if reason:
            return reason
        x = inputs.get("x")
        if isinstance(x, torch.Tensor):
            if x.dtype not in FEATURE_DTYPES:
                return f"x has dtype {x.dtype}; the cuda backend's tensor-core search takes float16 or bfloat16"
            if x.dim() == 3 and x.shape[2] % 8:
                return f"C = {x.shape[2]} is not a multiple of 8 (16-byte loads)"
            if x.dim() == 3 and x.shape[0] > 65535:
                return f"F = {x.shape[0]} frames exceed one launch's grid (65535)"
        for name in ("key_out", "residual", "weights"):
            t = inputs.get(name)
            if isinstance(t, torch.Tensor) and t.dtype not in DTYPE_CODES:
                return f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16"
        which = inputs.get("which")
        if isinstance(which, torch.Tensor) and which.dim() == 2 and which.shape[1] > MAX_J:
            return f"J = {which.shape[1]} keyframes per frame exceed the kernel's {MAX_J}"
        return None


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
        self._require("cosine_argmax", x=x, key_feats=key_feats, which=which)
        return self._run(x, key_feats, which, want_idx=True)

    def propagate(self, x, key_feats, key_out, which, weights, residual=None):
        self._require("propagate", x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights,
                      residual=residual)
        return self._run(x, key_feats, which, key_out=key_out, weights=weights, residual=residual)


register(CudaBackend())
