"""Micro-benchmark of `tokenflow.ops.propagate`: every backend against PyTorch, per UNet level.

Case: one denoising step's propagation at one self-attention layer, all groups in one call: N = K * B
frames (B = 8; K = 5 and 15, SD 2.1-base 512 x 512 levels of tokenflow.costmodel.SD21_LEVELS), R = 3
branches, residual added; frame f of group g searches keyframe g and, for g > 0, keyframe g - 1.
FLOP: the search, 2 * (2N - B) * S^2 * C (tokenflow.costmodel.propagate_flops).
Methods: every loaded backend that accepts the inputs (triton, cuda, cpu, faiss, torch = the reference),
`ref_pattern` (the original implementation's pattern: normalised copies, the full [B*S, 2S] similarity
matrix per group, gather with repeated indices), and `gemm_only` (torch.matmul of the search alone in the
feature dtype: no argmax, no gather; the tensor-core bound the fused kernels are measured against).

    python bench/bench_propagate.py [--json out.json] [--quick] [--dtype float16] [--reps 10]
    pytest bench/bench_propagate.py --benchmark-only      (pytest-benchmark; --quick shapes on CPU)

--quick (the default without CUDA) runs tiny shapes so a CPU smoke run finishes in seconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline  # noqa: E402,F401  (registers the "baseline" backend: the reference's pattern)
from harness import Report, backend_runs, benchmark_method, matmul_peak_tflops, parse_args, time_all  # noqa: E402

from tokenflow import costmodel  # noqa: E402
from tokenflow.ops import propagate, reference  # noqa: E402

B, R = 8, 3
QUICK_LEVELS = [(64, 320), (16, 640)]  # S, C: CPU smoke shapes


def blend_weights(N: int, B: int) -> torch.Tensor:
    """[N, 2] TokenFlow blend weights: w for the group's keyframe, 1 - w for the previous (group 0: 1, 0)."""
    w = torch.zeros(N, 2)
    for f in range(N):
        g = f // B
        if g == 0:
            w[f] = torch.tensor([1.0, 0.0])
            continue
        d1, d2 = abs(f - (g * B + B // 2)), abs(f - ((g - 1) * B + B // 2))
        s = torch.sigmoid(torch.tensor(d2 / (d1 + d2)))
        w[f] = torch.stack([s, 1 - s])
    return w


def make_case(S, C, K, B, dtype, device, seed=0):
    N = K * B
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, S, C, generator=g).to(device, dtype)
    key_feats = torch.randn(K, S, C, generator=g).to(device, dtype)
    key_out = torch.randn(R, K, S, C, generator=g).to(device, dtype)
    residual = torch.randn(R, N, S, C, generator=g).to(device, dtype)
    grp = torch.arange(N) // B
    which = torch.stack([grp, grp - 1], 1).to(device)  # group 0: -1
    return dict(x=x, key_feats=key_feats, key_out=key_out, which=which, weights=blend_weights(N, B).to(device),
                residual=residual)


def gemm_only(x, key_feats, which, **_):
    N, S, C = x.shape
    return [x[(which[:, j] >= 0)].reshape(-1, C) @ key_feats[0].T for j in range(which.shape[1])]


def methods(case, b):
    """name -> callable, for the loaded backends that accept `case`, plus the two PyTorch baselines;
    and name -> reason for those that do not."""
    run, skipped = backend_runs("propagate", case, lambda n: propagate(**case, backend=n))
    run["ref_pattern"] = lambda: propagate(**case, backend="baseline")  # bench/baseline.py
    run["gemm_only"] = lambda: gemm_only(**case)
    return run, skipped


def cases(quick: bool, ks=(5, 15)):
    levels = QUICK_LEVELS if quick else [(S, C) for S, C, _ in costmodel.SD21_LEVELS]
    for S, C in levels:
        for K in ((2,) if quick else ks):
            yield S, C, K, (2 if quick else B)


def main(argv=None) -> int:
    args, device, quick, dtype, reps = parse_args(__doc__, "propagate", argv)
    rep = Report("propagate_quick" if quick else "propagate", argv=None if argv is None else ["bench/bench_propagate.py", *argv],
                 device_type=device, dtype=str(dtype), quick=quick, R=R)
    peak = rep.meta["matmul_peak_tflops"] = matmul_peak_tflops(dtype, device)
    for S, C, K, b in cases(quick):
        case = make_case(S, C, K, b, dtype, device)
        N = K * b
        flop = costmodel.propagate_flops(S, C, N, 2) - costmodel.propagate_flops(S, C, b, 1)
        meta = {"S": S, "C": C, "K": K, "B": b, "N": N, "flop": flop}
        want = reference.propagate(**case)
        run, skipped = methods(case, b)
        time_all(rep, meta, run, skipped, want, flop=flop, peak=peak, reps=reps, quick=quick, device=device,
                 unchecked=("gemm_only",))
        del case, want
    rep.write(args.json)
    return 0


# --- pytest-benchmark entry points (not collected by the default `pytest` run: testpaths = ["tests"]) ---

def _bench_params():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [(S, C, K, b, device) for S, C, K, b in cases(device == "cpu")]


try:
    import pytest

    @pytest.mark.parametrize("S,C,K,b,device", _bench_params())
    @pytest.mark.parametrize("method", ["triton", "cuda", "cpu", "faiss", "torch", "ref_pattern", "gemm_only"])
    def test_propagate(benchmark, S, C, K, b, device, method):
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        case = make_case(S, C, K, b, dtype, device)
        run, skipped = methods(case, b)
        flop = costmodel.propagate_flops(S, C, K * b, 2) - costmodel.propagate_flops(S, C, b, 1)
        benchmark_method(benchmark, run, skipped, method, device, flop)
except ImportError:  # plain `python bench/bench_propagate.py` needs no pytest
    pass


if __name__ == "__main__":
    sys.exit(main())
