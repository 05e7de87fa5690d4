#!/usr/bin/env bash
# Build the decode kernel with several cp.async pipeline depths and benchmark each (GPU machine).
#   scripts/tune_stages.sh "4 6 8"      results: $OUT/stages_S.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
for S in ${1:-4 6 8}; do
  rm -f hf_int4/_C*.so
  NVCC_APPEND_FLAGS="-DHF_INT4_STAGES=$S" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
    python3 setup.py -q build_ext --inplace > "$OUT/build_stages_$S.log" 2>&1 || { echo "stages $S: build failed"; continue; }
  echo "=== stages $S"
  python3 -m hf_int4.bench --shapes "${SHAPES:-8192x8192,14336x4096,4096x4096}" --ms "${MS:-1,4,16,32,64,128}" \
    --json "$OUT/stages_$S.json" 2>&1 | grep -v "^#"
done
rm -f hf_int4/_C*.so
