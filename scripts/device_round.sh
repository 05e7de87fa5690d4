#!/usr/bin/env bash
# One device round (kept for reproducibility): why C++ errors crash here, GPU tests, grid sweep, benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/gpu_check.sh build > /dev/null 2>&1
export PYTHONPATH="$PWD:/tmp/site"
cuda-gdb -batch -ex run -ex bt --args python3 scripts/throw_check.py 2>&1 | grep -E "^#|signal|SIG" | head -25
TEST_ARGS="tests --deselect tests/test_decode_kernel.py::test_explicit_workspace_counters_are_left_zero --deselect tests/test_decode_kernel.py::test_bad_inputs_raise_clear_errors" \
  bash scripts/gpu_check.sh test 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed|=== " | cut -c1-250
python3 scripts/sweep_grid.py 8192x8192,4096x4096,14336x4096 1,16,64
bash scripts/gpu_check.sh bench 2>&1 | grep -vE "^===|^#"
