"""What a drop-in user gains: the reference implementation's own compute pattern for the two hot operations
against `tokenflow.ops` with every available backend, per UNet level of SD 2.1-base at 512 x 512.

Methods, timed interleaved round by round (a noisy machine slows all alike), best and median seconds:
  reference        the published implementation's pattern (bench/baseline.py): extended attention with K
                   copies of every keyframe's K/V and a Python loop over heads with materialised logits;
                   propagation with normalised copies, the dense [B*S, 2S] similarity matrix, index tensors
                   repeated over channels for gather, blend weights repeated to full size
  ops:<backend>    tokenflow.ops with that backend forced, for each available backend implementing the op
  ops:auto         tokenflow.ops with auto by measurement (a fresh measurement: no autotune file); the row
                   records the backend it picked
Shapes per level (S tokens, C channels, heads of d = 64): extended attention of one keyframe-pass layer, K
keyframes x 3 branches, no Q/K injection; propagation of one group pass, B frames x 3 branches, two
candidate keyframes, residual, frames that are shifted noisy copies of a keyframe (as video frames are).
Every row also holds its largest difference from the reference's output over the output's scale.
float32 on the CPU; float16 and bfloat16 on a GPU. Writes a JSON record with the machine (CPU model, ISA
flags, tokenflow._C kernel variant, torch's CPU capability, threads), date, versions and the command.
TOKENFLOW_CPU_ISA=avx2 with ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 stands for an AVX2-only host.

    python bench/bench_dropin.py [--device cpu|cuda] [--dtypes float32] [--levels 4096 1024 256 64]
                                 [--ops extended_attention propagate] [--keyframes 2] [--batch 8]
                                 [--rounds 3] [--quick] [--out PATH]
On a shared CPU, run it with OMP_NUM_THREADS=1: torch's many small ops otherwise spin-wait for threads
that other processes hold (seen here: the torch backend's propagation took 1 s at S = 64 with 2 threads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TOKENFLOW_AUTOTUNE_CACHE", "")  # ops:auto measures afresh, and writes no file
import baseline  # noqa: E402,F401  (registers the "baseline" backend: the reference's pattern)
from bench_propagate_cpu import machine_info  # noqa: E402
from harness_meta import environment, write_json  # noqa: E402

import tokenflow.ops as ops  # noqa: E402
from tokenflow.ops import autotune, backends  # noqa: E402

LEVELS = {4096: 320, 1024: 640, 256: 1280, 64: 1280}  # SD 2.1-base at 512 x 512: S -> C (d = 64)
QUICK = {64: 128, 16: 128}
D = 64


def attention_case(S, C, K, dtype, device, g):
    q, k, v = (torch.randn(3, K, S, C, generator=g).to(device, dtype) for _ in range(3))
    return dict(q=q, k=k, v=v, heads=C // D)


def propagation_case(S, C, B, dtype, device, g):
    key_feats = torch.randn(2, S, C, generator=g)
    shift = torch.randint(0, S, (B,), generator=g)
    x = torch.stack([key_feats[f % 2].roll(int(shift[f]), 0) for f in range(B)]) + 0.3 * torch.randn(B, S, C, generator=g)
    w = torch.rand(B, generator=g)
    return dict(x=x.to(device, dtype), key_feats=key_feats.to(device, dtype),
                key_out=torch.randn(3, 2, S, C, generator=g).to(device, dtype),
                which=torch.tensor([[1, 0]] * B, device=device), weights=torch.stack([w, 1 - w], 1).to(device),
                residual=torch.randn(3, B, S, C, generator=g).to(device, dtype))


def call(op: str, case: dict, backend: str | None):
    if op == "extended_attention":
        return ops.extended_attention(case["q"], case["k"], case["v"], case["heads"], backend=backend)
    return ops.propagate(case["x"], case["key_feats"], case["key_out"], case["which"], case["weights"],
                         case["residual"], backend=backend)


def methods(op: str, case: dict) -> dict[str, str | None]:
    """name -> backend argument: the reference's pattern, every available backend that runs the case, auto."""
    out = {"reference": "baseline"}
    why = backends.explain(op, **case)
    for name in backends.available():
        if why.get(name) is None:
            out[f"ops:{name}"] = name
    out["ops:auto"] = None
    return out


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def bench_case(op, case, level, dtype, device, rounds) -> list[dict]:
    runs = methods(op, case)
    times = {m: [] for m in runs}
    outputs = {}
    with torch.no_grad():
        for m, b in runs.items():  # warm-up (and auto's measurement), not counted
            _, outputs[m] = timed(lambda b=b: call(op, case, b), device)
        for _ in range(rounds):
            for m, b in runs.items():
                times[m].append(timed(lambda b=b: call(op, case, b), device)[0])
    ref = outputs["reference"].float()
    scale = float(ref.abs().max())
    picked = backends.choose(op, None, **case).name
    rows = []
    for m, ts in times.items():
        rows.append({"op": op, "S": level[0], "C": level[1], "dtype": str(dtype).replace("torch.", ""),
                     "method": m, "backend": picked if m == "ops:auto" else runs[m],
                     "best_s": min(ts), "median_s": statistics.median(ts),
                     "speedup_vs_reference": min(times["reference"]) / min(ts),
                     "max_diff_vs_reference": float((outputs[m].float() - ref).abs().max()) / scale})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="+", default=None, help="default: float32 on the CPU, float16 bfloat16 on a GPU")
    ap.add_argument("--levels", nargs="+", type=int, default=None, help="S of the levels (4096 1024 256 64)")
    ap.add_argument("--keyframes", type=int, default=None, help="K of extended attention (default 2 on the CPU, 5 on a GPU)")
    ap.add_argument("--batch", type=int, default=8, help="frames per group of a propagation pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", nargs="+", default=["extended_attention", "propagate"],
                    choices=["extended_attention", "propagate"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke test")
    ap.add_argument("--out", default=None, help="default bench/results/dropin_<device>.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["float16", "bfloat16"] if gpu else ["float32"]))]
    levels = QUICK if args.quick else {S: LEVELS[S] for S in (args.levels or LEVELS)}
    K = args.keyframes or (5 if gpu else 2)
    rounds = 1 if args.quick else args.rounds
    os.environ.setdefault(autotune.ENV, "1")
    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in dtypes:
        for S, C in levels.items():
            cases = {"extended_attention": lambda: attention_case(S, C, K, dtype, device, g),
                     "propagate": lambda: propagation_case(S, C, args.batch, dtype, device, g)}
            for op in args.ops:
                case = cases[op]()
                for row in bench_case(op, case, (S, C), dtype, device, rounds):
                    rows.append(row)
                    print(f"{row['op']:>18} S={S:>4} C={C:>4} {row['dtype']:>8} {row['method']:>16}: "
                          f"{row['best_s'] * 1e3:9.2f} ms (x{row['speedup_vs_reference']:.2f} vs reference, "
                          f"diff {row['max_diff_vs_reference']:.1e})", flush=True)
    command = "python bench/bench_dropin.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = environment(command.strip())
    from tokenflow.ops.capabilities import cpu_isa
    meta.update(machine_info(), tokenflow_ops=ops.__version__, cpu_kernel=cpu_isa(),
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                isa_env={k: os.environ.get(k) for k in ("TOKENFLOW_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")},
                keyframes=K, batch=args.batch, rounds=rounds, quick=args.quick,
                shapes="extended attention: [3, K, S, C], heads = C / 64; "
                       "propagation: B frames, 2 keyframes, 3 branches, residual")
    out = Path(args.out) if args.out else HERE / "results" / f"dropin_{device.type}.json"
    write_json(out, {"meta": meta, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
