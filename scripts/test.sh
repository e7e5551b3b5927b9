#!/usr/bin/env bash
# Install what is needed, lint (ruff), then run the whole test suite on the CPU (GPU tests skip without a GPU).
#
# Threads: one per process, and one pytest worker per core (pytest-xdist). The tests are many small
# tensor ops; on a shared 2-core machine torch's default of one OpenMP thread per core spin-waits at every
# op for a thread the other load has descheduled (the engine tests ran 2.1x slower beside one CPU-bound
# process with default threads than with one). One thread per process also makes every reduction order
# fixed. TOKENFLOW_TEST_WORKERS=0 runs in one process (e.g. to debug).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
workers=${TOKENFLOW_TEST_WORKERS:-$(OMP_NUM_THREADS= nproc)}  # nproc itself would honour OMP_NUM_THREADS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
ruff check .  # the linter's settings are pyproject.toml's [tool.ruff]
python -m pytest -q -n "$workers" "$@"
