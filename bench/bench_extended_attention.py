"""Micro-benchmark of `tokenflow.ops.extended_attention` against PyTorch SDPA compositions, per UNet level.

Case: one self-attention layer of the keyframe pass at SD 2.1-base 512 x 512 (tokenflow.costmodel.SD21_LEVELS,
heads of d = 64), K = 5 and 15 keyframes, R = 3 branches, with and without Q/K injection (shared_qk).
FLOP: tokenflow.costmodel.extended_attention_flops (4 S^2 C K for the source branch + 2 * 4 (K S)^2 C).
With shared_qk the work is smaller (one QK^T and softmax for both branches >= 1) but the model counts the
unshared FLOP, so TFLOP/s of shared rows read as "equivalent" throughput and the time is what compares.
Methods:
  <backend>          each loaded backend that accepts the inputs (triton; torch = tokenflow.ops.reference)
  sdpa_<BACKEND>     the same work composed from torch SDPA with that SDPA backend forced
                     (torch.nn.attention.sdpa_kernel: FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION,
                     MATH): branch 0 as a batch of K frames; branches >= 1 as one batch of K*S-token
                     sequences, no K/V copies (a branch's frames are contiguous). With shared_qk the two V's go
                     side by side (one 2d-wide V, one softmax) where the SDPA backend allows a V head dim
                     unequal to q's, else one call per branch. A row records the error when a backend refuses.
MATH materialises the logits and is skipped above 8 GiB of them.

    python bench/bench_extended_attention.py [--json out.json] [--quick] [--dtype float16] [--reps 10]
    pytest bench/bench_extended_attention.py --benchmark-only
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Report, backend_runs, benchmark_method, matmul_peak_tflops, parse_args, time_all  # noqa: E402

from tokenflow import costmodel  # noqa: E402
from tokenflow.ops import extended_attention, reference  # noqa: E402

R, D = 3, 64
SDPA_BACKENDS = {"FLASH": SDPBackend.FLASH_ATTENTION, "EFFICIENT": SDPBackend.EFFICIENT_ATTENTION,
                 "CUDNN": SDPBackend.CUDNN_ATTENTION, "MATH": SDPBackend.MATH}
QUICK_LEVELS = [(64, 128), (16, 256)]  # S, C (d = 64): CPU smoke shapes
MATH_LIMIT_BYTES = 8 << 30


def make_case(S, C, K, shared, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    Rq = 1 if shared else R
    q, k = (torch.randn(Rq, K, S, C, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(R, K, S, C, generator=g).to(device, dtype)
    return dict(q=q, k=k, v=v, heads=C // D, shared_qk=shared)


def sdpa_composition(q, k, v, heads, shared_qk, out):
    """Extended attention from SDPA calls (the active sdpa_kernel backend), written into `out` [R, K, S, C]."""
    Rv, K, S, C = v.shape
    d = C // heads

    def frames(t):  # [K, S, C] -> [K, heads, S, d] (a view)
        return t.view(K, S, heads, d).transpose(1, 2)

    def seq(t):  # [K, S, C] -> [1, heads, K*S, d]: all keyframes of a branch as one sequence (a view)
        return t.reshape(1, K * S, heads, d).transpose(1, 2)

    def store(r, o):  # [1, heads, K*S, d'] -> out[r]
        out[r] = o.transpose(1, 2).reshape(K, S, C)

    out[0] = F.scaled_dot_product_attention(frames(q[0]), frames(k[0]), frames(v[0])).transpose(1, 2).reshape(K, S, C)
    if Rv == 1:
        return out
    if shared_qk:
        try:  # one softmax for both branches: V's side by side along the head dim
            vv = torch.cat([seq(v[r]) for r in range(1, Rv)], dim=-1)
            o = F.scaled_dot_product_attention(seq(q[0]), seq(k[0]), vv, scale=d ** -0.5)
            for i, r in enumerate(range(1, Rv)):
                store(r, o[..., i * d:(i + 1) * d])
            return out
        except RuntimeError:  # this SDPA backend needs V's head dim equal to q's
            pass
    for r in range(1, Rv):
        b = 0 if shared_qk else r
        store(r, F.scaled_dot_product_attention(seq(q[b]), seq(k[b]), seq(v[r])))
    return out


def methods(case, device):
    inputs = {n: case[n] for n in ("q", "k", "v", "heads", "shared_qk")}
    run, skipped = backend_runs("extended_attention", inputs, lambda n: extended_attention(**inputs, backend=n))
    R_, K, S, C = case["v"].shape
    out = torch.empty_like(case["v"])
    logits = (K * S) ** 2 * case["heads"] * 4
    for label, sdp in SDPA_BACKENDS.items():
        if label == "MATH" and logits > MATH_LIMIT_BYTES:
            skipped[f"sdpa_{label}"] = f"would materialise {logits / 2**30:.0f} GiB of logits"
            continue

        def fn(sdp=sdp):
            with sdpa_kernel([sdp]):
                return sdpa_composition(**inputs, out=out)
        run[f"sdpa_{label}"] = fn
    return run, skipped


def cases(quick: bool):
    levels = QUICK_LEVELS if quick else [(S, C) for S, C, _ in costmodel.SD21_LEVELS]
    for S, C in levels:
        for K in ((2,) if quick else (5, 15)):
            for shared in (False, True):
                yield S, C, K, shared


def main(argv=None) -> int:
    args, device, quick, dtype, reps = parse_args(__doc__, "extended_attention", argv)
    rep = Report("extended_attention_quick" if quick else "extended_attention",
                 argv=None if argv is None else ["bench/bench_extended_attention.py", *argv],
                 device_type=device, dtype=str(dtype), quick=quick, R=R, d=D)
    peak = rep.meta["matmul_peak_tflops"] = matmul_peak_tflops(dtype, device)
    for S, C, K, shared in cases(quick):
        case = make_case(S, C, K, shared, dtype, device)
        flop = costmodel.extended_attention_flops(S, C, K, R)
        meta = {"S": S, "C": C, "K": K, "heads": C // D, "shared_qk": shared, "flop": flop}
        want = reference.extended_attention(case["q"], case["k"], case["v"], case["heads"], shared_qk=shared)
        run, skipped = methods(case, device)
        time_all(rep, meta, run, skipped, want, flop=flop, peak=peak, reps=reps, quick=quick, device=device)
        del case, want
    rep.write(args.json)
    return 0


# --- pytest-benchmark entry points (not collected by the default `pytest` run: testpaths = ["tests"]) ---

try:
    import pytest

    _DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

    @pytest.mark.parametrize("S,C,K,shared", list(cases(_DEVICE == "cpu")))
    @pytest.mark.parametrize("method", ["triton", "torch", *(f"sdpa_{b}" for b in SDPA_BACKENDS)])
    def test_extended_attention(benchmark, S, C, K, shared, method):
        dtype = torch.bfloat16 if _DEVICE == "cuda" else torch.float32
        case = make_case(S, C, K, shared, dtype, _DEVICE)
        run, skipped = methods(case, _DEVICE)
        benchmark_method(benchmark, run, skipped, method, _DEVICE, costmodel.extended_attention_flops(S, C, K, R))
except ImportError:
    pass


if __name__ == "__main__":
    sys.exit(main())
