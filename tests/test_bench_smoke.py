"""The benchmark scripts and the GPU session script run (tiny model or one round, CPU); they measure nothing here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_session_dry_run(tmp_path):
    """scripts/gpu_session.sh --dry-run runs every step of the GPU session on the CPU (the built extension,
    test collection, the micro- and end-to-end benchmarks at smoke size) and checks its result files, so a
    lent GPU's minutes go to the kernels, not to script bugs."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), "--dry-run"], cwd=ROOT,
                       env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    for step in ("wheels", "device", "build", "tests", "micro-benchmarks", "end-to-end", "results"):
        assert f"== {step}" in r.stdout
    assert "GPU-marked tests selected" in (tmp_path / "tests.log").read_text()
    data = json.loads((tmp_path / "pipeline.json").read_text())
    modes = {(row["mode"], row["stage"]) for row in data["rows"]}
    assert modes == {(m, s) for m in ("tokenflow", "reference_pattern") for s in ("invert_2", "edit_2")}
    (edit,) = [r for r in data["rows"] if (r["mode"], r["stage"]) == ("tokenflow", "edit_2")]
    assert edit["simulated_peak_gib"] > 0  # tokenflow.memsim for the same plan, next to the measured peak
    assert data["meta"]["smoke"] and data["meta"]["command"].startswith("python bench/bench_pipeline.py")
    assert "| frames |" in (tmp_path / "pipeline.md").read_text()
    for name in ("bench_propagate", "bench_extended_attention"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["rows"]


def test_result_check_names_what_is_missing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"meta": {"device": "x"}, "rows": []}))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "check_results.py"), str(bad)], capture_output=True,
                       text=True)
    assert r.returncode == 1 and "meta lacks 'date'" in r.stderr and "no rows" in r.stderr


def test_cpu_propagation_benchmark_smoke(tmp_path):
    # One round at the real shape (a few seconds): the record has every method, the counters, agreement.
    pytest.importorskip("tokenflow._C")
    out = tmp_path / "propagate_cpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_propagate_cpu.py"), "--rounds", "1",
                        "--dtypes", "float32", "--inputs", "video", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = json.loads(out.read_text())["results"]
    assert set(res["methods"]) == {"cpu", "reference", "ref_pattern", "gemm_only", "cpu_fp32_search"}
    assert res["presearch"]["rows"] in (0, 16384)  # 0 where the CPU has no AVX512-BF16
    assert res["agreement"]["index_mismatches"] <= 16


def test_cpu_propagation_benchmark_per_isa_smoke(tmp_path):
    # --isa: one child process per kernel variant, merged; the variant really ran is recorded.
    pytest.importorskip("tokenflow._C")
    out = tmp_path / "propagate_cpu_isa.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_propagate_cpu.py"), "--rounds", "1",
                        "--dtypes", "float32", "--inputs", "random", "--isa", "avx2", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    (row,) = data["cpu_vs_torch"]
    assert row["isa"] in ("avx2", "generic") and row["cpu_vs_torch"] > 0  # generic where the CPU lacks AVX2
    assert data["by_isa"]["avx2"]["isa_env"]["TOKENFLOW_CPU_ISA"] == "avx2"


def test_dropin_benchmark_smoke(tmp_path):
    """bench/bench_dropin.py --quick: every op has the reference's pattern, each available backend that runs
    it, and auto (naming what it picked), all agreeing with the reference; the record passes check_results."""
    from tokenflow.ops import backends

    out = tmp_path / "dropin.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dropin.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    for op in ("extended_attention", "propagate"):
        rows = {row["method"]: row for row in data["rows"] if row["op"] == op and row["S"] == 64}
        assert {"reference", "ops:torch", "ops:auto"} <= set(rows)
        assert rows["ops:auto"]["backend"] in backends.available()
        assert all(row["max_diff_vs_reference"] < 1e-4 for row in rows.values()), rows
    assert {"cpu_isa_flags", "torch_cpu_capability", "tokenflow_ops"} <= set(data["meta"])
    check = subprocess.run([sys.executable, str(ROOT / "bench" / "check_results.py"), str(out)], capture_output=True)
    assert check.returncode == 0
