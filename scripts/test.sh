#!/usr/bin/env bash
# Install what is needed, then run the whole test suite on the CPU (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest -q "$@"
