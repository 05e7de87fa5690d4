#!/usr/bin/env bash
# One device round (kept for reproducibility): GPU tests, the C++ error path, pipeline-depth tuning.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/gpu_check.sh build > /dev/null 2>&1
export PYTHONPATH="$PWD:/tmp/site"
TEST_ARGS="tests --deselect tests/test_decode_kernel.py::test_explicit_workspace_counters_are_left_zero" \
  bash scripts/gpu_check.sh test 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed|=== " | cut -c1-220
python3 scripts/throw_check.py 2>&1 | tail -3
bash scripts/tune_stages.sh "4 6 8"
