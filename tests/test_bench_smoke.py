"""The benchmark scripts run (tiny model or one round, CPU); they measure nothing here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_benchmark_smoke(tmp_path):
    out = tmp_path / "pipeline.json"
    md = tmp_path / "pipeline.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--smoke", "--baseline",
                        "--json", str(out), "--markdown", str(md)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    modes = {(row["mode"], row["stage"]) for row in data["rows"]}
    assert modes == {(m, s) for m in ("tokenflow", "reference_pattern") for s in ("invert_2", "edit_2")}
    (edit,) = [r for r in data["rows"] if (r["mode"], r["stage"]) == ("tokenflow", "edit_2")]
    assert edit["simulated_peak_gib"] > 0  # tokenflow.memsim for the same plan, next to the measured peak
    assert data["meta"]["smoke"] and data["meta"]["command"].startswith("python bench/bench_pipeline.py")
    assert "| frames |" in md.read_text()


def test_micro_benchmarks_smoke(tmp_path):
    for name in ("bench_propagate", "bench_extended_attention"):
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--json", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(out.read_text())


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
