"""The end-to-end benchmark script runs (tiny model, CPU); it measures nothing here."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_benchmark_smoke(tmp_path):
    out = tmp_path / "pipeline.json"
    md = tmp_path / "pipeline.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--smoke", "--baseline",
                        "--json", str(out), "--markdown", str(md)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    modes = {(row["mode"], row["stage"]) for row in data["rows"]}
    assert modes == {(m, s) for m in ("tokenflow", "reference_pattern") for s in ("invert_2", "edit_2")}
    assert data["meta"]["smoke"] and data["meta"]["command"].startswith("python bench/bench_pipeline.py")
    assert "| frames |" in md.read_text()


def test_micro_benchmarks_smoke(tmp_path):
    for name in ("bench_propagate", "bench_extended_attention"):
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--json", str(out)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(out.read_text())
