"""Offline checkpoint tools behind the `hf-int4` CLI: repack a GPTQ checkpoint, inspect a checkpoint."""
import json
import os
import shutil

import torch
from tqdm.auto import tqdm

from hf_int4 import _extension
from hf_int4.formats.files import ShardWriter, atomic_output_dir
from hf_int4.formats.gptq import (
    GPTQConfig,
    GPTQFormatError,
    ModuleRules,
    iter_checkpoint,
    load_quantization_config,
    safetensors_files,
    tensor_shapes,
)
from hf_int4.integration.config import QUANT_METHOD, HfInt4Config
from hf_int4.modules import pack_for_module, packed_state_dict, quantized_layer_names

WEIGHT_FILES = ("config.json", "quantize_config.json", "model.safetensors.index.json")


def repack_checkpoint(src, dst, *, dtype=torch.float16, device=None, overwrite=False, max_shard_size="4GB", progress=True):
    """Convert the GPTQ checkpoint `src` into a packed hf_int4 checkpoint `dst`, shard by shard.

    Reads one input shard at a time and writes output shards of at most `max_shard_size`, so memory
    stays bounded; packs on the GPU when one is available. `dst` appears only when complete; `src` is
    never written."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src or real_dst.startswith(real_src + os.sep):
        raise ValueError(f"the output {dst} must not be (inside) the input checkpoint {src}")
    if real_src.startswith(real_dst + os.sep):  # replacing dst (--overwrite) would delete the input
        raise ValueError(f"the output {dst} must not contain the input checkpoint {src}")
    quantization_config = load_quantization_config(src)
    rules = ModuleRules.from_dict(quantization_config)
    if device is None:
        device = "cuda" if torch.cuda.is_available() and _extension.extension_available() else "cpu"
    total = len(quantized_layer_names(tensor_shapes(safetensors_files(src))))
    if total == 0:  # else the output would claim a packed checkpoint and hold the input's tensors unchanged
        raise GPTQFormatError(f"{src} holds no GPTQ layers (no tensor named *.qweight): nothing to repack")
    with atomic_output_dir(dst, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size)
        bar = tqdm(total=total, desc="hf-int4 repack", unit="layer", disable=not progress)
        for kind, name, obj in iter_checkpoint(src, device, rules):
            if kind == "tensor":
                writer.add(name, obj)
                continue
            bias = None if obj.bias is None else obj.bias.to(dtype)
            for key, tensor in packed_state_dict(pack_for_module(obj, dtype), bias, f"{name}.").items():
                writer.add(key, tensor)
            bar.update()
        bar.close()
        writer.finish()
        with open(os.path.join(src, "config.json")) as f:
            model_config = json.load(f)
        packed = HfInt4Config.from_gptq_dict(quantization_config)
        packed.mark_packed(dtype)
        model_config["quantization_config"] = packed.to_dict()
        model_config["dtype"] = str(dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model_config, f, indent=2, sort_keys=True)
        for entry in sorted(os.listdir(src)):  # tokenizer, generation config, license, ...
            path = os.path.join(src, entry)
            if os.path.isfile(path) and entry not in WEIGHT_FILES and not entry.endswith(".safetensors"):
                shutil.copy2(path, os.path.join(tmp, entry))
    return dst


def describe_checkpoint(checkpoint_dir) -> dict:
    """Format, settings, layer count and size of a GPTQ or packed hf_int4 checkpoint."""
    with open(os.path.join(checkpoint_dir, "config.json")) as f:
        model_config = json.load(f)
    try:  # where the loader reads it: config.json, else quantize_config.json (older AutoGPTQ, no quant_method)
        qc = load_quantization_config(checkpoint_dir)
    except GPTQFormatError:
        qc = {}
    files = safetensors_files(checkpoint_dir)
    keys = tensor_shapes(files)
    tensors = len(keys)
    layers = len(quantized_layer_names(keys))
    method = str(qc.get("quant_method", "gptq" if qc else "none")).lower()
    if method == QUANT_METHOD:
        fmt = f"hf_int4 packed ({qc.get('packed_layout')}, {qc.get('packed_dtype')})"
    elif method == "gptq":
        try:  # the loader's reading of the format (GPTQModel writes it as "format")
            fmt = f"GPTQ ({GPTQConfig.from_dict(qc).checkpoint_format})"
        except GPTQFormatError as exc:
            fmt = f"GPTQ, not loadable: {exc}"
    else:
        fmt = method
    return {
        "path": os.path.abspath(checkpoint_dir),
        "architecture": (model_config.get("architectures") or ["?"])[0],
        "format": fmt,
        "bits": qc.get("bits"),
        "group_size": qc.get("group_size"),
        "sym": qc.get("sym"),
        "desc_act": qc.get("desc_act"),
        "dynamic_rules": ", ".join(dict(qc.get("dynamic") or {})) or "none",  # GPTQModel's per-module settings
        "quantized_layers": layers,
        "tensors": tensors,
        "shards": len(files),
        "size_bytes": sum(os.path.getsize(p) for p in files),
    }
