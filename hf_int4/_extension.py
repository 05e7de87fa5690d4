"""Loads the compiled CUDA extension once and says, once, when it is not there."""
import functools
import logging
import warnings

import torch

logger = logging.getLogger("hf_int4")


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from hf_int4 import _C  # noqa: F401  (registers torch.ops.hf_int4.*)
    except ImportError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=None)
def _load_hopper():
    if _load() is not None:
        return _load()
    try:
        from hf_int4 import _hopper  # noqa: F401  (registers torch.ops.hf_int4.hopper_int4_gemm)
    except ImportError as exc:
        return str(exc)
    return None


def hopper_available() -> bool:
    """True when `hf_int4._hopper` (the sm_90a CUTLASS kernel) is built and loaded."""
    return _load_hopper() is None


def extension_available() -> bool:
    """True when `hf_int4._C` is built and loaded (its ops are then registered)."""
    return _load() is None


def kernels_usable(device: torch.device) -> bool:
    """True when the GPU kernels can run on `device`; warns once when CUDA is present but the extension is not."""
    if device.type != "cuda":
        return False
    if extension_available():
        return True
    _warn_missing_extension()
    return False


@functools.lru_cache(maxsize=None)
def _warn_missing_extension():
    warnings.warn(
        f"hf_int4: the CUDA extension is unavailable ({_load()}); using the exact reference path, "
        "which is correct but slow. Reinstall with `pip install --no-build-isolation -e .` where nvcc "
        "and a CUDA build of torch are present.",
        stacklevel=3,
    )


@functools.lru_cache(maxsize=None)
def warn_reference_path_once(reason: str):
    """One clear warning per reason that the slow reference path serves a model."""
    warnings.warn(f"hf_int4: {reason}; using the exact reference path (correct but slow).", stacklevel=2)
