"""The `triton` backend: the kernels of `tokenflow.kernels` (kernels/propagate.py, kernels/extended_attention.py).

Runs all three operations on CUDA tensors in float32, float16 or bfloat16 (float32 search uses exact
ieee products on CUDA cores; float16/bfloat16 use tensor cores), extended attention for head dims up to
256 (40, 64, 80, 160 and 64 are the SD family's). Under TRITON_INTERPRET=1 the same kernels run on CPU
tensors in Triton's interpreter so the tests exercise them; that is ~0.2 GFLOP/s, so the backend then
takes no part in `auto` dispatch (ask for it by name) and refuses bfloat16 (the interpreter's bf16
`tl.dot` is silently wrong).
Import fails (and the registry says why) when triton is not installed.
"""
from __future__ import annotations

from contextlib import nullcontext as _nullcontext

import torch

from tokenflow.kernels import extended_attention as _ea
from tokenflow.kernels import propagate as _prop
from tokenflow.ops.backends import Backend, register

INTERPRET = _prop.INTERPRET


class TritonBackend(Backend):
    name = "triton"
    ops = ("extended_attention", "propagate", "cosine_argmax")
    auto = not INTERPRET  # never let `auto` route real work to the interpreter

    def why_not(self, op, **inputs):
        if op not in self.ops:
            return f"does not implement {op}"
        tensors = {n: t for n, t in inputs.items() if isinstance(t, torch.Tensor)}
        for name, t in tensors.items():
            if INTERPRET:
                if t.device.type != "cpu":
                    return f"{name} is on {t.device}; with TRITON_INTERPRET=1 the kernels run on CPU tensors only"
            elif t.device.type != "cuda":
                return f"{name} is on {t.device} and TRITON_INTERPRET is not set; the triton backend takes CUDA tensors"
            if name != "which" and t.dtype == torch.bfloat16 and INTERPRET:
                return f"{name} is bfloat16: the Triton interpreter's bf16 tl.dot gives wrong results"
        if not INTERPRET and tensors:
            dev = next(iter(tensors.values())).device
            major, minor = torch.cuda.get_device_capability(dev)
            if major < 8 and any(t.dtype == torch.bfloat16 for t in tensors.values()):
                return f"bfloat16 needs sm_80 or newer; {dev} is sm_{major}{minor}"
        if op == "extended_attention":
            v, heads = inputs.get("v"), inputs.get("heads")
            if isinstance(v, torch.Tensor) and v.dim() == 4 and heads:
                d = v.shape[3] // heads
                if d > _ea.MAX_HEAD_DIM:
                    return f"head dim {d} (C = {v.shape[3]}, heads = {heads}) exceeds the kernel's {_ea.MAX_HEAD_DIM}"
        return None


    def extended_attention(self, q, k, v, heads, *, shared_qk=False, scale=None):
        self._require("extended_attention", q=q, k=k, v=v, heads=heads, shared_qk=shared_qk)
        with torch.cuda.device(v.device) if v.is_cuda else _nullcontext():
            return _ea.extended_attention(q, k, v, heads, shared_qk=shared_qk, scale=scale)

    def cosine_argmax(self, x, key_feats, which):
        self._require("cosine_argmax", x=x, key_feats=key_feats, which=which)
        with torch.cuda.device(x.device) if x.is_cuda else _nullcontext():
            return _prop.cosine_argmax(x, key_feats, which)

    def propagate(self, x, key_feats, key_out, which, weights, residual=None):
        self._require("propagate", x=x, key_feats=key_feats, key_out=key_out, which=which, weights=weights,
                      residual=residual)
        with torch.cuda.device(x.device) if x.is_cuda else _nullcontext():
            # return_idx=False: the indices stay in registers, nothing is allocated besides the output
            return _prop.propagate(x, key_feats, which, key_out, weights, residual, return_idx=False)[0]


register(TritonBackend())
