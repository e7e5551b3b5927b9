#!/usr/bin/env bash
# One call on a lent GPU machine: install carried wheels, build the CUDA extension, run the kernel tests and
# every GPU-marked test, then the micro- and end-to-end benchmarks, results into $OUT.
#
#   bash scripts/gpu_session.sh            on the GPU machine (device tool: carry=[".whl"])
#   bash scripts/gpu_session.sh --dry-run  on any CPU machine (CI runs it): every step runs, with the GPU
#                                          parts replaced by their CPU stand-ins (the built extension instead
#                                          of a CUDA build, test collection instead of GPU test runs,
#                                          benchmark smoke sizes), and the result files are checked the same way
#
# Before the GPU call (the GPU image has torch, triton, transformers, pybind11, cmake, ninja; not diffusers, av, faiss):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 av==18.1.0 faiss-cpu==1.15.1
# Then: run(command="bash scripts/gpu_session.sh", carry=[".whl"]) and copy $OUT's JSON into bench/results/.
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
KERNEL_TESTS="tests/test_propagate.py tests/test_propagate_native.py tests/test_extended_attention.py tests/test_csrc_build.py"
step() { echo "== $*"; }
fail() { echo "gpu_session: $*" >&2; exit 1; }

step "wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || fail "installing the carried wheels failed"
  export PYTHONPATH=/tmp/site:$PWD
elif [ $DRY = 0 ]; then
  fail "no .whl/ folder: download the wheels first (see the header of this script)"
fi

step "device"
if [ $DRY = 1 ]; then
  echo "dry run: no GPU" | tee "$OUT/device.txt"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt" || fail "no GPU"
fi

step "build"
if [ $DRY = 1 ]; then  # the extension the install already built (CUDA compile checks are tests/test_csrc_build.py's)
  python3 -c "from tokenflow import _C; print(_C.build_info())" 2>&1 | tee "$OUT/build.log"
else
  TOKENFLOW_CUDA=on python3 -m pip install -q --no-deps --no-build-isolation -e ./packaging/tokenflow-ops 2>&1 | tail -20 | tee "$OUT/build.log"
fi
python3 -c "import tokenflow.ops as o; print('backends:', o.available())" | tee -a "$OUT/build.log" \
  || fail "tokenflow.ops does not import"

step "tests: the kernels against the reference, then every GPU-marked test"
if [ $DRY = 1 ]; then
  python3 -m pytest -q --collect-only $KERNEL_TESTS | tail -1 | tee "$OUT/tests.log"
  n=$(python3 -m pytest -q --collect-only -m gpu tests | grep -c "::") || true
  echo "$n GPU-marked tests selected" | tee -a "$OUT/tests.log"
  [ "$n" -gt 0 ] || fail "no GPU-marked test collected"
else
  python3 -m pytest -q -m "not gpu" $KERNEL_TESTS 2>&1 | tail -40 | tee "$OUT/tests.log"  # GPU-marked: next line
  python3 -m pytest -q -m gpu tests 2>&1 | tail -40 | tee -a "$OUT/tests.log"
fi
SANITIZE="compute-sanitizer --tool memcheck python3 -m pytest -q -m gpu tests/test_propagate.py"
if [ $DRY = 1 ]; then
  echo "would run: $SANITIZE" | tee "$OUT/sanitizer.log"
elif command -v compute-sanitizer >/dev/null; then
  $SANITIZE 2>&1 | tail -15 | tee "$OUT/sanitizer.log"
fi

step "micro-benchmarks"
QUICK=""; [ $DRY = 1 ] && QUICK="--quick"
for b in bench_propagate bench_extended_attention; do
  python3 "bench/$b.py" $QUICK --json "$OUT/$b.json" 2>&1 | tail -30 || fail "bench/$b.py failed"
done

step "end-to-end"
if [ $DRY = 1 ]; then
  E2E="--smoke"
else
  E2E="--frames 40 120 --inversion-steps 50"
fi
python3 bench/bench_pipeline.py $E2E --baseline --json "$OUT/pipeline.json" --markdown "$OUT/pipeline.md" 2>&1 \
  | tail -30 || fail "bench/bench_pipeline.py failed"

step "results"
python3 bench/check_results.py "$OUT"/bench_propagate.json "$OUT"/bench_extended_attention.json "$OUT"/pipeline.json \
  || fail "a result file lacks what bench/results/ needs"
echo "results in $OUT"
