"""The batch benchmark runs (1 video x 2 prompts, tiny steps, CPU); it measures nothing here."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # five processes, each importing torch and diffusers and loading the tiny model
def test_batch_benchmark_smoke(tmp_path):
    out = tmp_path / "batch.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_batch.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] and data["meta"]["command"].startswith("python bench/bench_batch.py")
    # counted from what the processes did: one load and one inversion in the batch, one load per process
    # and one inversion per item in the harness pattern
    assert (data["batch"]["model_loads"], data["batch"]["inversions"], data["batch"]["items_done"]) == (1, 1, 2)
    assert (data["per_item"]["processes"], data["per_item"]["model_loads"], data["per_item"]["inversions"]) == (4, 4, 2)
    assert data["batch"]["seconds"] > 0 and data["per_item"]["seconds"] > 0
