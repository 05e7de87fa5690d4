"""Build hf_int4 with its CUDA extension `hf_int4._C` where a CUDA build of torch and nvcc exist.

Without them the package installs as pure Python and runs the exact reference path.
Archs come from TORCH_CUDA_ARCH_LIST (default: Ampere + Hopper).
"""
import glob
import os
import re
import shutil

from setuptools import find_packages, setup

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def find_cuda_home():
    """The toolkit root whose include/ has the CUDA runtime headers. torch guesses it from `which nvcc`,
    which is wrong where nvcc is a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates += [os.path.dirname(os.path.dirname(nvcc))] if nvcc else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def cuda_extension():
    """The CUDAExtension, or None (with the reason) when this machine cannot build it."""
    if os.environ.get("HF_INT4_NO_CUDA") == "1":
        return None, "HF_INT4_NO_CUDA=1"
    if find_cuda_home():
        os.environ["CUDA_HOME"] = find_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not installed at build time (use --no-build-isolation)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return None, "no CUDA toolkit (nvcc and its headers) was found"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.relpath(p, here)
        for p in glob.glob(os.path.join(here, "hf_int4", "csrc", "*.cpp")) + glob.glob(os.path.join(here, "hf_int4", "csrc", "*.cu"))
    )
    ext = CUDAExtension(
        name="hf_int4._C",
        sources=sources,
        # No -std here: BuildExtension adds the standard the installed torch was built with, and a
        # different one can break the C++ ABI shared with libtorch (e.g. exceptions crossing it).
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        py_limited_api=False,
    )
    exts = [ext]
    hopper, why_no_hopper = hopper_extension(CUDAExtension, CUDA_HOME, here)
    if hopper is None:
        print(f"hf_int4: building without the Hopper kernel ({why_no_hopper}); other paths serve large batches.")
    else:
        exts.append(hopper)
    return (exts, BuildExtension.with_options(use_ninja=True)), None


def cutlass_headers():
    """CUTLASS/CuTe include dirs from the PyPI package nvidia-cutlass (`pip install --no-deps nvidia-cutlass`)."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], "source")
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    return dirs if os.path.exists(os.path.join(dirs[0], "cute", "tensor.hpp")) else None


def curand_include(cuda_home):
    """CUTLASS's mixed-input utilities include curand; the toolkit has it, or pip's nvidia/cu*/include."""
    import site

    for d in [os.path.join(cuda_home, "include")] + [
        p for base in site.getsitepackages() for p in sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    ]:
        if os.path.exists(os.path.join(d, "curand_kernel.h")):
            return d
    return None


def hopper_schedule_units(here, csrc):
    """One translation unit per dtype, Hopper schedule and variant (hopper_schedules.cuh lists the configurations;
    hopper_gemm.h's kZeroPointSchedules those also built with zero points), written under build/; a file is rewritten
    only when its text changes, so that rebuilds stay incremental."""
    with open(os.path.join(here, csrc, "hopper_gemm.h")) as f:
        header = f.read()
    count = re.search(r"constexpr int kHopperSchedules = (\d+);", header)
    zero_mask = re.search(r"constexpr unsigned kZeroPointSchedules =([^;]+);", header)
    if count is None or zero_mask is None:
        raise RuntimeError(f"{csrc}/hopper_gemm.h: kHopperSchedules or kZeroPointSchedules not found")
    with_zeros = {int(bit) for bit in re.findall(r"1u << (\d+)", zero_mask.group(1))}
    out = os.path.join("build", "hopper_schedules")
    os.makedirs(os.path.join(here, out), exist_ok=True)
    units = []
    for dtype, name in enumerate(("float16", "bfloat16")):  # HopperDtype
        for schedule in range(int(count.group(1))):
            for zeros in (0, 1) if schedule in with_zeros else (0,):
                variant = ", zero points" if zeros else ""
                text = (f"// Written by setup.py: the Hopper int4 GEMM's schedule {schedule} for {name}{variant}.\n"
                        f"#define HF_INT4_HOPPER_DTYPE {dtype}\n#define HF_INT4_HOPPER_SCHEDULE {schedule}\n"
                        f"#define HF_INT4_HOPPER_ZEROS {zeros}\n"
                        '#include "hopper_schedules.cuh"\n')
                path = os.path.join(out, f"hopper_{name}_{schedule:02d}{'_zeros' if zeros else ''}.cu")
                full = os.path.join(here, path)
                if not os.path.exists(full) or open(full).read() != text:
                    with open(full, "w") as f:
                        f.write(text)
                units.append(path)
    return units


def hopper_extension(CUDAExtension, cuda_home, here):
    """hf_int4._hopper (sm_90a only, CUTLASS), or None and why not."""
    if os.environ.get("HF_INT4_NO_HOPPER") == "1":
        return None, "HF_INT4_NO_HOPPER=1"
    if "9.0" not in os.environ["TORCH_CUDA_ARCH_LIST"]:
        return None, "TORCH_CUDA_ARCH_LIST has no 9.0"
    includes = cutlass_headers()
    if includes is None:
        return None, "no CUTLASS headers (pip install --no-deps nvidia-cutlass)"
    curand = curand_include(cuda_home)
    if curand is None:
        return None, "no curand_kernel.h (CUTLASS's mixed-input utilities need it)"
    csrc = os.path.join("hf_int4", "csrc", "hopper")
    return CUDAExtension(
        name="hf_int4._hopper",
        sources=[os.path.join(csrc, "hopper_ops.cpp")] + hopper_schedule_units(here, csrc),
        include_dirs=[os.path.join(here, csrc)] + includes
        + ([curand] if curand != os.path.join(cuda_home, "include") else []),
        extra_compile_args={
            "cxx": ["-O3"],
            # an explicit -gencode replaces TORCH_CUDA_ARCH_LIST's for this extension only
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
                     "-DNDEBUG"],
        },
        py_limited_api=False,
    ), None


built, why_not = cuda_extension()
if built is None:
    print(f"hf_int4: building without the CUDA extension ({why_not}); the reference path will be used.")
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = built[0], {"build_ext": built[1]}

setup(
    name="hf_int4",
    version="0.1.0",
    description="Fast 4-bit GPTQ inference in Hugging Face transformers at every batch size",
    packages=find_packages(include=["hf_int4", "hf_int4.*"]),
    package_data={"hf_int4": ["csrc/*", "csrc/hopper/*", "tables/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "transformers>=5.0", "accelerate", "safetensors", "tqdm"],
    extras_require={
        "test": ["pytest", "gguf"],
        "demo": ["gguf"],
        "optimum": ["optimum"],
    },
    entry_points={"console_scripts": ["hf-int4=hf_int4.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
