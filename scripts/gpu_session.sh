#!/usr/bin/env bash
# One call on a lent GPU machine: install carried wheels, build the CUDA extension, run every test with
# the GPU (GPU-marked ones included), then the micro- and end-to-end benchmarks, results into $OUT.
#
# Here, before the call (the GPU image has torch, triton, transformers, pybind11, cmake, ninja; not diffusers, av, faiss):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 av==18.1.0 faiss-cpu==1.15.1
# Then: run(command="bash scripts/gpu_session.sh", carry=[".whl"]) and copy $OUT's JSON into bench/results/.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"

echo "== build (CUDA on)"
TOKENFLOW_CUDA=on python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -20 | tee "$OUT/build.log"
python3 -c "import tokenflow.ops as o; print('backends:', o.available())" | tee -a "$OUT/build.log"

echo "== tests (GPU)"
python3 -m pytest -q -x tests 2>&1 | tail -40 | tee "$OUT/tests.log"
command -v compute-sanitizer >/dev/null && compute-sanitizer --tool memcheck python3 -m pytest -q -m gpu \
    tests/test_propagate_native.py 2>&1 | tail -15 | tee "$OUT/sanitizer.log"

echo "== micro-benchmarks"
for b in bench/bench_propagate.py bench/bench_extended_attention.py; do
  [ -f "$b" ] && timeout 240 python3 "$b" --json "$OUT/$(basename "$b" .py).json" 2>&1 | tail -30
done

echo "== end-to-end"
timeout 420 python3 bench/bench_pipeline.py --frames 40 120 --inversion-steps 50 --baseline \
    --json "$OUT/pipeline.json" --markdown "$OUT/pipeline.md" 2>&1 | tail -30
