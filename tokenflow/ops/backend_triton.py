"""The `triton` backend: the kernels of `tokenflow.kernels` (kernels/propagate.py, kernels/extended_attention.py).

Runs all three operations on CUDA tensors in float32, float16 or bfloat16 (bfloat16 needs sm_80+; float32
search uses exact ieee products on CUDA cores, float16/bfloat16 tensor cores), extended attention for
head dims up to 256 (40, 64, 80, 160 are the SD family's). Under TRITON_INTERPRET=1 the same kernels run
on CPU tensors in Triton's interpreter so the tests exercise them; that is ~0.2 GFLOP/s, so the backend
then declares `INTERPRETED`: never picked by `auto` (ask for it by name), no bfloat16 (the interpreter's
bf16 `tl.dot` is silently wrong). Unavailable (and the registry says why) when triton does not import,
or when PyTorch sees no CUDA device and TRITON_INTERPRET is not set.
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext as _nullcontext

import torch

from tokenflow.ops.backends import Backend, register
from tokenflow.ops.capabilities import Capabilities

# As kernels/propagate.py reads it (when the kernels are defined), known here without importing triton.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 256  # kernels/extended_attention.py MAX_HEAD_DIM, declared without importing triton

try:
    from tokenflow.kernels import extended_attention as _ea
    from tokenflow.kernels import propagate as _prop
    MISSING = None
except ImportError as e:
    _ea = _prop = None
    MISSING = f"the Triton kernels do not import ({e}); install triton (`pip install triton`, or the extra tokenflow-ops[triton])"

ON_GPU = Capabilities(
    ops=("extended_attention", "propagate", "cosine_argmax"), devices=("cuda",),
    min_sm={torch.bfloat16: (8, 0)}, max_head_dim=MAX_HEAD_DIM, device_note="TRITON_INTERPRET is not set")
INTERPRETED = dataclasses.replace(
    ON_GPU, devices=("cpu",), dtypes=(torch.float32, torch.float16), min_sm={},
    device_note="with TRITON_INTERPRET=1 the kernels run on CPU tensors only",
    dtype_note="the Triton interpreter's bf16 tl.dot gives wrong results",
    auto=False, auto_note="TRITON_INTERPRET=1: the interpreter is for tests; ask for it by name")


class TritonBackend(Backend):
    name = "triton"
    caps = ON_GPU

    def capabilities(self):
        return INTERPRETED if INTERPRET else ON_GPU

    def declarations(self):
        return [("`triton`", ON_GPU), ("`triton` (TRITON_INTERPRET=1)", INTERPRETED)]

    def unavailable(self):
        return MISSING or super().unavailable()

    def extended_attention(self, q, k, v, heads, *, shared_qk=False, scale=None):
        with torch.cuda.device(v.device) if v.is_cuda else _nullcontext():
            return _ea.extended_attention(q, k, v, heads, shared_qk=shared_qk, scale=scale)

    def cosine_argmax(self, x, key_feats, which):
        with torch.cuda.device(x.device) if x.is_cuda else _nullcontext():
            return _prop.cosine_argmax(x, key_feats, which)

    def propagate(self, x, key_feats, key_out, which, weights, residual=None):
        with torch.cuda.device(x.device) if x.is_cuda else _nullcontext():
            # return_idx=False: the indices stay in registers, nothing is allocated besides the output
            return _prop.propagate(x, key_feats, which, key_out, weights, residual, return_idx=False)[0]


register(TritonBackend())
