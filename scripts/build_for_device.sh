#!/usr/bin/env bash
# Build the CUDA extensions on this (GPU-less) machine for the GPU machine and pack them as .carry/extensions.tar.xz:
# a device call that carries .carry unpacks them (`python3 -m tarfile -e .carry/extensions.tar.xz .`) instead of
# spending ~380 s of device time on `gpu_check.sh build`. Needs nvcc here and the GPU machine's torch
# (DEVICE_TORCH, default 2.11.0: pip finds its CUDA 13.0 build here), installed into its own virtual environment on
# first use. The extensions' only Python API is the module init (PyModule_Create, stable across Python versions), so
# this Python's build loads in the GPU machine's Python once named for it (DEVICE_PY_TAG).
# Builds the tracked files as they are in the working tree, incrementally, in DEVICE_BUILD_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version="${DEVICE_TORCH:-2.11.0}"
tag="${DEVICE_PY_TAG:-cpython-312-x86_64-linux-gnu}"
venv="${DEVICE_VENV:-/tmp/venv_torch_$torch_version}"
dir="${DEVICE_BUILD_DIR:-/tmp/hf_int4_device_build}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_version" setuptools
  "$venv/bin/pip" install -q --no-deps "nvidia-cutlass==4.2.0.0"
fi
# Copy only what changed, so ninja rebuilds only the units whose sources did.
git ls-files | while read -r f; do
  cmp -s "$f" "$dir/$f" || { mkdir -p "$dir/$(dirname "$f")" && cp "$f" "$dir/$f"; }
done
# ...and drop sources no longer here: setup.py compiles every csrc/*.cu and *.cpp it finds.
(cd "$dir" && find hf_int4/csrc -type f) | while read -r f; do
  [ -e "$f" ] || rm "$dir/$f"
done
(cd "$dir" && CC=/usr/bin/gcc CXX=/usr/bin/g++ TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-2}" \
  "$venv/bin/python" setup.py -q build_ext --inplace)
staging=$(mktemp -d)
mkdir -p "$staging/hf_int4" .carry
for so in "$dir"/hf_int4/_C.*.so "$dir"/hf_int4/_hopper.*.so; do
  [ -f "$so" ] || continue
  name=$(basename "$so")
  cp "$so" "$staging/hf_int4/${name%%.*}.$tag.so"
done
(cd "$staging" && python3 -m tarfile -c "$OLDPWD/.carry/extensions.tar.xz" hf_int4)
rm -rf "$staging"
ls -l .carry/extensions.tar.xz
