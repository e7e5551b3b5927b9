#!/usr/bin/env bash
# Set up .venv with everything the project needs (idempotent). Used by quickstart.sh, test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Keep a torch that is already there (a CUDA build on a GPU machine); otherwise take the pinned CPU wheel
# (an unpinned `torch` would pull several GB of CUDA packages).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# Two distributions from this checkout, both editable: tokenflow-ops (tokenflow.ops, the Triton kernels and
# the C++/CUDA extension, built with CMake + ninja) and the editor, which depends on it; extras bring
# triton, faiss, pytest.
python -m pip install -q -e ./packaging/tokenflow-ops -e ".[test]"
