"""Check benchmark result files before they go into bench/results/: each must say on what device, when,
with which versions and by which command it was measured, and hold at least one row.

    python bench/check_results.py OUT/pipeline.json ...   (exit 1, naming the file and what is missing)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REQUIRED = ("device", "date", "torch", "python", "command")
# Drop-in records (bench_dropin.py) also say what the CPU offers and which kernel variant ran, since the
# ranking of the backends depends on it.
REQUIRED_BY_PREFIX = {"dropin": ("cpu_model", "cpu_isa_flags", "torch_cpu_capability", "torch_threads",
                                 "tokenflow_ops", "isa_env")}


def problems(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"{path}: unreadable ({e})"]
    meta = data.get("meta", {})
    extra = next((keys for prefix, keys in REQUIRED_BY_PREFIX.items() if path.name.startswith(prefix)), ())
    out = [f"{path}: meta lacks {key!r}" for key in (*REQUIRED, *extra) if meta.get(key) in (None, "")]
    if not data.get("rows"):
        out.append(f"{path}: no rows")
    return out


def main(argv: list[str]) -> int:
    found = [p for arg in argv for p in problems(Path(arg))]
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found or not argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
