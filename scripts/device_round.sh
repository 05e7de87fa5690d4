#!/usr/bin/env bash
# One device round (kept for reproducibility): which host compiler lets C++ errors reach Python; GPU tests.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"; mkdir -p "$OUT"
bash scripts/gpu_check.sh build > /dev/null 2>&1
export PYTHONPATH="$PWD:/tmp/site"
echo "CC=${CC:-} CXX=${CXX:-}"; which gcc g++; gcc --version | head -1; /opt/gcc/bin/gcc --version | head -1
python3 -c "import torch; print(torch._C._GLIBCXX_USE_CXX11_ABI, torch.__config__.show().splitlines()[:6])" 2>&1 | tail -2
python3 scripts/throw_check.py 2>&1 | tail -2
rm -rf build hf_int4/_C*.so
CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py -q build_ext --inplace > "$OUT/build_sysgcc.log" 2>&1 \
  || { echo "system gcc build failed"; tail -5 "$OUT/build_sysgcc.log"; bash scripts/gpu_check.sh build > /dev/null 2>&1; }
python3 scripts/throw_check.py 2>&1 | tail -3
python3 -m pytest -p no:cacheprovider -q tests/test_decode_kernel.py tests/test_integration_gpu.py 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | cut -c1-250
