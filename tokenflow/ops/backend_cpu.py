"""The `cpu` backend: the C++ kernel of tokenflow._C (csrc/propagate_cpu.cpp), OpenMP over torch's threads.

Runs `propagate` and `cosine_argmax` on CPU tensors with float32, bfloat16 or float16 features (x,
key_feats) and any of those for key_out / residual. The search is a packed GEMM whose epilogue is a
running argmax (never the [F*S, S] similarity matrix), accumulated in float32 like the reference (bf16
features on CPUs with AVX512-BF16 multiply in bf16 with vdpbf16ps: the products are exact in float32, about
2x faster). float32 and float16 features on those CPUs are searched in bf16 first, then every candidate the
bf16 rounding error cannot rule out is rescored in float32: the indices are the float32 search's, bit for
bit, about 1.7x faster (TOKENFLOW_CPU_PRESEARCH=0 turns this off). The gather-blend accumulates in
float32. The glue here makes inputs contiguous (a copy, only when they are not), allocates the outputs
and hands raw pointers to the kernel. Without the built extension the backend is unavailable and says why.

`auto` times it against the torch backend on first use at each shape class (autotune.py): the AVX2 variant
measured 0.63-0.73x torch's speed here (0.86-1.04x against a torch capped to AVX2), AVX-512 without BF16
0.81-1.08x, while with AVX512-BF16 it measured 1.8-2.6x on an AMD EPYC (bench/results/propagate_cpu_isa*.json,
bench/results/propagate_cpu.json; docs/backend.md section 6 has the table). Without measurement
(TOKENFLOW_AUTOTUNE=0) auto takes it only with the AVX512-BF16 variant (`AUTO_ISAS`). By name it runs with
any variant.
"""
from __future__ import annotations

import os

import torch

from tokenflow.ops.backends import Backend, register
from tokenflow.ops.capabilities import Capabilities
from tokenflow.ops.native import MISSING, _C  # MISSING: why the extension is absent, or None

# Element type codes of csrc/propagate.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def presearch_enabled() -> bool:
    """The bf16 pre-search for float32/float16 features (exact; see csrc/propagate_cpu.cpp), unless
    TOKENFLOW_CPU_PRESEARCH=0. Read per call, so a benchmark can compare both in one process."""
    return os.environ.get("TOKENFLOW_CPU_PRESEARCH", "1") != "0"


def _dense(t: torch.Tensor) -> torch.Tensor:
    # The kernel indexes raw row-major memory; a strided view (a slice, a transpose) is copied once here.
    return t if t.is_contiguous() else t.contiguous()


# The CPU kernel variants (tokenflow._C.build_info()["cpu_isa"]) with which unmeasured `auto` picks this backend.
AUTO_ISAS = ("avx512bf16",)


class CpuBackend(Backend):
    name = "cpu"
    caps = Capabilities(
        ops=("propagate", "cosine_argmax"), devices=("cpu",),
        max_tokens=2**31 - 1,  # candidate indices are int32 inside the kernel
        auto_cpu_isas=AUTO_ISAS,
        auto_note="it measured slower than the torch backend there (docs/backend.md); ask for it by name, "
                  "or let auto measure (TOKENFLOW_AUTOTUNE=1)")

    def unavailable(self):
        return MISSING or super().unavailable()

    def cosine_argmax(self, x, key_feats, which):
        F_, S, C = x.shape
        x, key_feats = _dense(x), _dense(key_feats)
        which64 = _dense(which.to(torch.int64))
        idx = torch.empty(F_, which.shape[1], S, dtype=torch.int64)
        _C.propagate_cpu(
            x.data_ptr(), key_feats.data_ptr(), 0, which64.data_ptr(), 0, 0, 0, idx.data_ptr(),
            F_, which.shape[1], key_feats.shape[0], 0, S, C,
            DTYPE_CODES[x.dtype], 0, 0, torch.get_num_threads(), presearch=presearch_enabled())
        return idx

    def propagate(self, x, key_feats, key_out, which, weights, residual=None):
        R, K = key_out.shape[:2]
        F_, S, C = x.shape
        x, key_feats, key_out = _dense(x), _dense(key_feats), _dense(key_out)
        which64 = _dense(which.to(torch.int64))
        w32 = _dense(weights.to(torch.float32))
        res = _dense(residual) if residual is not None else None
        out = torch.empty(R, F_, S, C, dtype=key_out.dtype)
        _C.propagate_cpu(
            x.data_ptr(), key_feats.data_ptr(), key_out.data_ptr(), which64.data_ptr(), w32.data_ptr(),
            res.data_ptr() if res is not None else 0, out.data_ptr(), 0,
            F_, which.shape[1], K, R, S, C,
            DTYPE_CODES[x.dtype], DTYPE_CODES[key_out.dtype], DTYPE_CODES[res.dtype] if res is not None else 0,
            torch.get_num_threads(), presearch=presearch_enabled())
        return out


register(CpuBackend())
