"""The shared micro-benchmark harness of bench/bench_<op>.py: time a callable, collect comparable rows, write JSON.

Timing: `warmup` untimed calls, then `reps` timed calls; on CUDA each call is timed with CUDA events
(device time, no host sync inside the timed region), on CPU with perf_counter. Rows report the median
and the minimum; TFLOP/s come from `tokenflow.costmodel` (the one FLOP model of benchmarks and docs).
Results: bench/results/<name>.json with device, date, torch/triton versions and the command line
(bench/harness_meta.py), one row per (case, method).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness_meta import environment, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_fn(fn, *, warmup: int = 3, reps: int = 10, device: str = "cpu") -> dict:
    """Seconds per call of `fn()`: {"median_s", "min_s", "reps"}, plus "peak_extra_bytes" on CUDA
    (peak allocation during the calls beyond what was allocated before them: workspace + outputs)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        extra = torch.cuda.max_memory_allocated() - base
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        extra = None
    row = {"median_s": statistics.median(times), "min_s": min(times), "reps": reps}
    if extra is not None:
        row["peak_extra_bytes"] = int(extra)
    return row


def measure(fn, flop: float, **kw) -> dict:
    """`time_fn` plus TFLOP/s at the median; an exception becomes {"error": ...} so one failing method
    (an SDPA backend that refuses the shape, an OOM) does not end the run."""
    try:
        row = time_fn(fn, **kw)
    except Exception as e:  # recorded, not raised: the row says why this method has no time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    row["tflops"] = flop / row["median_s"] / 1e12
    return row


class Report:
    """Rows of one benchmark run, written as bench/results/<name>.json (or `path`)."""

    def __init__(self, name: str, argv: list[str] | None = None, **meta):
        self.name = name
        argv = sys.argv if argv is None else argv
        self.meta = environment("python " + " ".join([_rel(argv[0]), *argv[1:]]))
        self.meta.update(meta)
        self.rows: list[dict] = []

    def add(self, case: dict, method: str, result: dict) -> dict:
        row = {**case, "method": method, **result}
        self.rows.append(row)
        shown = f"{result['median_s'] * 1e3:9.3f} ms {result['tflops']:7.2f} TFLOP/s" if "median_s" in result \
            else result.get("error", result.get("skipped", ""))
        print(f"{' '.join(f'{k}={v}' for k, v in case.items())} {method:>24}: {shown}", flush=True)
        return row

    def write(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else RESULTS / f"{self.name}.json"
        write_json(path, {"benchmark": self.name, "meta": self.meta, "rows": self.rows})
        print(f"wrote {path}")
        return path


def _rel(p: str) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return p


def matmul_peak_tflops(dtype=torch.bfloat16, device: str = "cuda", n: int = 8192) -> float | None:
    """Measured dense-matmul throughput (an n^3 torch.matmul in `dtype`): the "% of peak" denominator.
    None on CPU, where the benchmarks run smoke shapes only."""
    if torch.device(device).type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, warmup=3, reps=10, device=device)
    return 2 * n ** 3 / t["min_s"] / 1e12


def parse_args(doc: str, name: str, argv=None):
    """The options every micro-benchmark takes. Returns (args, device, quick, dtype, reps)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help=f"output path (default bench/results/{name}[_quick].json)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the default without CUDA)")
    ap.add_argument("--dtype", default=None, help="float16 / bfloat16 / float32 (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    reps = args.reps or (3 if quick else 10)
    return args, device, quick, dtype, reps


def backend_runs(op: str, inputs: dict, call) -> tuple[dict, dict]:
    """name -> callable for every loaded backend that accepts `inputs` for `op` (call(backend_name) runs it),
    and name -> reason for the others."""
    from tokenflow.ops import backends

    run, skipped = {}, {}
    reasons = backends.explain(op, **inputs)
    for name in backends.available():
        if reasons[name]:
            skipped[name] = reasons[name]
        elif not backends.get(name).capabilities().auto:
            skipped[name] = "not for real work here (e.g. the Triton interpreter): " + backends.get(name).why_not_auto()
        else:
            run[name] = (lambda n: lambda: call(n))(name)
    return run, skipped


def time_all(rep, meta: dict, run: dict, skipped: dict, want, *, flop: float, peak, reps: int, quick: bool,
             device: str, unchecked=()) -> None:
    """Time every method of one case into `rep`, with % of the matmul peak and the error vs `want`."""
    for name, reason in skipped.items():
        rep.add(meta, name, {"skipped": reason})
    for name, fn in run.items():
        row = measure(fn, flop, reps=reps, warmup=1 if quick else 3, device=device)
        if "median_s" in row and peak:
            row["pct_of_matmul_peak"] = 100 * row["tflops"] / peak
        if "median_s" in row and name not in unchecked:
            row["max_abs_diff_vs_reference"] = float((fn().float() - want.float()).abs().max())
        rep.add(meta, name, row)


def benchmark_method(benchmark, run: dict, skipped: dict, method: str, device: str, model_flop: float) -> None:
    """The pytest-benchmark body of the micro-benchmarks: skip a method that did not load or refuses the
    shape (saying why), then time it with pytest-benchmark, synchronising the device after every call."""
    import pytest

    if method not in run:
        pytest.skip(skipped.get(method, f"{method} is not loaded"))
    fn = run[method]
    try:
        fn()
    except RuntimeError as e:
        pytest.skip(f"{method} refuses this shape: {str(e).splitlines()[0]}")
    benchmark.extra_info["model_flop"] = model_flop
    benchmark(lambda: (fn(), sync(device)))
