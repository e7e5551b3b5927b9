"""Benchmark of `propagate` on the CPU: the `cpu` backend (csrc/propagate_cpu.cpp) against PyTorch.

Shapes: the 32x32 level of SD 2.1-base at 512x512: a group of B = 8 frames, S = 1024 tokens, C = 640
channels, two candidate keyframes per frame (the group's own and the previous group's), R = 3 branches,
with the residual added. Timed, interleaved round by round so that a noisy machine slows all alike:
  cpu             tokenflow.ops.propagate(..., backend="cpu") (where the CPU has AVX512-BF16, see
                  build_info()["cpu_isa"] in the results: bf16 features searched with vdpbf16ps; float32
                  features pre-searched in bf16 and rescored exactly in float32, counters in "presearch")
  cpu_fp32_search (float32 only) the same with TOKENFLOW_CPU_PRESEARCH=0: the float32 search alone
  reference       tokenflow.ops.reference.propagate (blocked PyTorch, the `torch` backend)
  ref_pattern     the original TokenFlow implementation's pattern (bench/baseline.py): normalised copies,
                  the full [B*S, 2S] similarity matrix in the features' dtype, index tensors repeated over
                  channels for gather, blend weights repeated to full size
  gemm_only       torch's float32 GEMM for the search alone (B*S x S x C, twice), no argmax, no gather
  gemm_only_native  (bf16 only) the same GEMM in bfloat16, as torch would run it without upcasting
Three kinds of inputs: "random" (independent Gaussian tokens), "video" (a smooth random field over the 32x32
grid for the keyframes, the frames shifted copies plus noise: near-duplicate tokens, as flat image regions
give, which widen the pre-search's rescoring window) and "duplicates" (every candidate within 1e-4 of one
vector: the pre-search's worst case, where every window overflows and the float32 search decides).
Writes bench/results/propagate_cpu.json (min and median seconds per method, GFLOP/s of the search,
speed-ups, agreement with the reference, machine and versions).

`--isa avx2 avx512bf16` runs the whole benchmark once per CPU kernel variant, each in its own process with
TOKENFLOW_CPU_ISA capping the variant (the choice is made once per process), and writes one report with a
"by_isa" entry per variant and "cpu_vs_torch" (the torch backend's time over the cpu backend's, per dtype
and inputs): the data behind the variants with which `auto` picks the cpu backend
(tokenflow/ops/backend_cpu.py AUTO_ISAS; default output bench/results/propagate_cpu_isa.json). The cap
applies to this project's kernel only; to stand for an AVX2-only host, cap torch too
(MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2, recorded in "isa_env").

    python bench/bench_propagate_cpu.py [--rounds 7] [--dtypes float32 bfloat16] [--inputs random video duplicates]
                                        [--isa generic avx2 avx512 avx512bf16 ...] [--threads N] [--clock wall|cpu]
                                        [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline  # noqa: E402,F401  (registers the "baseline" backend: the reference's pattern)

from tokenflow.ops import cosine_argmax, propagate, reference  # noqa: E402

B, S, C, R, J = 8, 1024, 640, 3, 2
# TokenFlow's blend weights for B = 8: w for the group's own keyframe, 1 - w for the previous.
W_CUR = [0.622, 0.651, 0.679, 0.706, 0.731, 0.711, 0.697, 0.687]


def make_inputs(dtype: torch.dtype, kind: str = "random", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(B, S, C, generator=g).to(dtype)
        key_feats = torch.randn(2, S, C, generator=g).to(dtype)  # keyframe 0: previous group's, 1: this group's
    elif kind == "duplicates":  # every candidate nearly the same vector
        base = torch.randn(C, generator=g)
        x = torch.randn(B, S, C, generator=g).to(dtype)
        key_feats = (base + 1e-4 * torch.randn(2, S, C, generator=g)).to(dtype)
    else:  # "video": smooth keyframe features over the 32x32 grid, frames shifted noisy copies
        side = int(S ** 0.5)
        field = torch.nn.functional.interpolate(torch.randn(2, C, side // 4, side // 4, generator=g),
                                                size=(side, side), mode="bicubic", align_corners=False)
        key_feats = field.flatten(2).transpose(1, 2).contiguous()
        x = torch.stack([torch.roll(key_feats[1 - f % 2].view(side, side, C), shifts=(f % 3, f % 2), dims=(0, 1))
                         for f in range(B)]).view(B, S, C) + 0.05 * torch.randn(B, S, C, generator=g)
        x, key_feats = x.to(dtype), key_feats.to(dtype)
    key_out = torch.randn(R, 2, S, C, generator=g).to(dtype)
    residual = torch.randn(R, B, S, C, generator=g).to(dtype)
    which = torch.tensor([[1, 0]] * B)
    w = torch.tensor(W_CUR)
    weights = torch.stack([w, 1 - w], dim=1)
    return x, key_feats, key_out, which, weights, residual


def gemm_only(x, key_feats, native=False):
    dtype = x.dtype if native else torch.float32
    xf = x.to(dtype).reshape(B * S, C)
    return [xf @ key_feats[k].to(dtype).T for k in range(2)]


def machine_info() -> dict:
    model = platform.processor()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in f" {flags} "]
    return {"cpu_model": model, "machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_isa_flags": isa, "platform": platform.platform()}


def presearch_counters(x, key_feats, which) -> dict:
    """The kernel's own counters for one search: rows pre-searched, candidates rescored, rows re-searched."""
    from tokenflow import _C
    from tokenflow.ops.backend_cpu import DTYPE_CODES

    idx = torch.empty(B, J, S, dtype=torch.int64)
    stats = torch.zeros(3, dtype=torch.int64)
    _C.propagate_cpu(x.data_ptr(), key_feats.data_ptr(), 0, which.data_ptr(), 0, 0, 0, idx.data_ptr(), B, J, 2, 0,
                     S, C, DTYPE_CODES[x.dtype], 0, 0, torch.get_num_threads(), presearch=True,
                     stats=stats.data_ptr())
    rows, rescored, fallback = stats.tolist()
    return {"rows": rows, "rescored_per_row": round(rescored / max(rows, 1), 2), "rows_searched_in_float32": fallback}


def without_presearch(fn):
    def run():
        os.environ["TOKENFLOW_CPU_PRESEARCH"] = "0"
        try:
            return fn()
        finally:
            del os.environ["TOKENFLOW_CPU_PRESEARCH"]
    return run


def bench_dtype(dtype: torch.dtype, kind: str, rounds: int, clock=time.perf_counter) -> dict:
    inputs = make_inputs(dtype, kind)
    x, key_feats = inputs[0], inputs[1]
    methods = {
        "cpu": lambda: propagate(*inputs, backend="cpu"),
        "reference": lambda: reference.propagate(*inputs),
        "ref_pattern": lambda: propagate(*inputs, backend="baseline"),  # bench/baseline.py
        "gemm_only": lambda: gemm_only(x, key_feats),
    }
    if dtype != torch.float32:
        methods["gemm_only_native"] = lambda: gemm_only(x, key_feats, native=True)
    else:
        methods["cpu_fp32_search"] = without_presearch(methods["cpu"])

    # Agreement first (also the warm-up): the same indices as the reference on these random inputs,
    # outputs equal up to float32 summation order and the output dtype's rounding.
    out_cpu, out_ref = methods["cpu"](), methods["reference"]()
    idx_cpu = cosine_argmax(x, key_feats, inputs[3], backend="cpu")
    idx_ref = reference.cosine_argmax(x, key_feats, inputs[3])
    agreement = {"index_mismatches": int((idx_cpu != idx_ref).sum()), "indices": idx_ref.numel(),
                 "max_abs_diff_vs_reference": float((out_cpu.float() - out_ref.float()).abs().max())}
    for fn in methods.values():
        fn()

    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    search_flop = 2.0 * B * J * S * S * C
    res = {}
    for name, ts in times.items():
        res[name] = {"min_s": round(min(ts), 5), "median_s": round(statistics.median(ts), 5),
                     "search_gflops_at_min": round(search_flop / min(ts) / 1e9, 1)}
    cpu = res["cpu"]["min_s"]
    speedups = {f"cpu_vs_{n}": round(res[n]["min_s"] / cpu, 2) for n in res if n != "cpu"}
    out = {"dtype": str(dtype).replace("torch.", ""), "inputs": kind, "methods": res, "speedup_min": speedups,
           "agreement": agreement}
    if dtype == torch.float32:
        out["presearch"] = presearch_counters(x, key_feats, inputs[3])
    return out


def by_isa(args, argv) -> int:
    """One child process per ISA (TOKENFLOW_CPU_ISA), the reports merged into one file."""
    results = Path(__file__).resolve().parent / "results"
    out = Path(args.out or results / "propagate_cpu_isa.json")
    rest = [a for a in argv if a not in args.isa and a not in ("--isa",)]
    if "--out" in rest:
        i = rest.index("--out")
        del rest[i:i + 2]
    reports, ratios = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for isa in args.isa:
            part = Path(tmp) / f"{isa}.json"
            subprocess.run([sys.executable, __file__, *rest, "--out", str(part)], check=True,
                           env=dict(os.environ, TOKENFLOW_CPU_ISA=isa))
            reports[isa] = json.loads(part.read_text())
            ran = reports[isa]["versions"]["tokenflow_C"]["cpu_isa"]
            for r in reports[isa]["results"]:
                ratios.append({"isa": ran, "torch_cpu_capability": reports[isa]["torch_cpu_capability"],
                               "dtype": r["dtype"], "inputs": r["inputs"],
                               "cpu_min_s": r["methods"]["cpu"]["min_s"],
                               "torch_min_s": r["methods"]["reference"]["min_s"],
                               "cpu_vs_torch": r["speedup_min"]["cpu_vs_reference"]})
    first = next(iter(reports.values()))
    report = {"benchmark": "propagate_cpu_isa", "shape": first["shape"],
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "bench/bench_propagate_cpu.py", *argv]),
              "machine": first["machine"], "versions": first["versions"], "timing": first["timing"],
              "cpu_vs_torch": ratios, "by_isa": reports}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    tmp_out.replace(out)
    for r in ratios:
        print(f"{r['isa']:>10} (torch {r['torch_cpu_capability']}) {r['dtype']:>8} {r['inputs']:>10}: "
              f"cpu {r['cpu_min_s'] * 1e3:.1f} ms, torch {r['torch_min_s'] * 1e3:.1f} ms, torch/cpu {r['cpu_vs_torch']}")
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--inputs", nargs="+", default=["random", "video", "duplicates"],
                    choices=["random", "video", "duplicates"])
    ap.add_argument("--isa", nargs="+", choices=["generic", "avx2", "avx512", "avx512bf16"],
                    help="one run per CPU kernel variant, merged (default output propagate_cpu_isa.json)")
    ap.add_argument("--threads", type=int, default=None, help="torch (and cpu backend) threads; default torch's")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared machine; use with --threads 1)")
    ap.add_argument("--out", default=None, help="default bench/results/propagate_cpu.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    argv = sys.argv[1:] if argv is None else list(argv)
    if args.isa:
        return by_isa(args, argv)
    args.out = args.out or str(Path(__file__).resolve().parent / "results" / "propagate_cpu.json")

    from tokenflow import _C  # fails clearly if the extension is not built

    # CPU time of this process: on a shared machine it does not count the time other processes hold the
    # cores (with one thread it is the work's own cost; with more it also counts threads spinning at barriers).
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    results = [bench_dtype(getattr(torch, d), kind, args.rounds, clock) for kind in args.inputs for d in args.dtypes]
    report = {
        "benchmark": "propagate_cpu",
        "shape": {"B": B, "S": S, "C": C, "R": R, "J": J, "keyframes": 2, "residual": True},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        # Caps on the ISA: TOKENFLOW_CPU_ISA for the cpu backend; MKL's and ATen's for torch (an AVX2-only host)
        "isa_env": {k: os.environ.get(k) for k in ("TOKENFLOW_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "tokenflow_C": _C.build_info()},
        "timing": f"{args.rounds} interleaved rounds after one warm-up; min and median "
                  f"{'process CPU' if args.clock == 'cpu' else 'wall'} time, {torch.get_num_threads()} thread(s)",
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    tmp_out.replace(out)
    for r in results:
        line = ", ".join(f"{n} {v['min_s'] * 1e3:.1f} ms" for n, v in r["methods"].items())
        print(f"{r['inputs']} {r['dtype']}: {line}; speed-up {r['speedup_min']}; {r['agreement']}"
              f"{'; ' + str(r['presearch']) if 'presearch' in r else ''}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
