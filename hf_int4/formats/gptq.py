"""The 4-bit GPTQ checkpoint format (AutoGPTQ / GPTQModel / optimum) and a validating reader.

Layout of one quantized linear (K = in_features, N = out_features, G = number of groups):

    qweight int32 [K/8, N]  nibble j (bits 4j..4j+3, LSB first) of word [r, n] is q[8r + j, n]
    qzeros  int32 [G, N/8]  nibble j of word [g, c] is the stored zero of (group g, column 8c + j)
    scales  fp16  [G, N]   (some writers store bf16 or fp32: read as stored)
    g_idx   int32 [K]       group of input row k
    bias    [N] (optional)

    w[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])

"gptq" (v1) checkpoints store zero - 1 in qzeros (a historical off-by-one of GPTQ-for-LLaMa that
AutoGPTQ kept); "gptq_v2" (GPTQModel) stores the zero itself.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch

QUANT_SUFFIXES = ("qweight", "qzeros", "scales")  # the three tensors every quantized layer must have
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # scales as checkpoints store them
LAYER_SUFFIXES = QUANT_SUFFIXES + ("g_idx", "bias")
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble j lives at bits 4j..4j+3


class GPTQFormatError(ValueError):
    """A GPTQ checkpoint or config we cannot (or must not) load; the message names the layer and setting."""


def is_excluded_module(name: str, modules_to_not_convert) -> bool:
    """True when module `name` is one of (or inside, or ends with) the names in modules_to_not_convert."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in modules_to_not_convert)


def _fail(layer: str, msg: str):
    raise GPTQFormatError(f"layer {layer}: {msg}" if layer else msg)


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group spanning all of K (per output channel)
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = "gptq"  # "gptq" (v1: stored zero = z - 1) or "gptq_v2" (stored zero = z)

    def __post_init__(self):
        if self.bits != 4:
            raise GPTQFormatError(f"hf_int4 supports 4-bit GPTQ only; quantization_config has bits={self.bits}")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or (gs > 0 and gs % 16 == 0)):
            raise GPTQFormatError(
                f"unsupported group_size={gs!r} in quantization_config: expected -1 (one group per output "
                "channel) or a positive multiple of 16"
            )
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise GPTQFormatError(
                f"unknown checkpoint_format={self.checkpoint_format!r} in quantization_config; "
                f"hf_int4 reads {' and '.join(CHECKPOINT_FORMATS)}"
            )
        for key in ("sym", "desc_act"):
            if not isinstance(getattr(self, key), bool):
                raise GPTQFormatError(f"quantization_config {key}={getattr(self, key)!r} must be true or false")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTQConfig":
        """From config.json["quantization_config"] or quantize_config.json; unknown keys are ignored."""
        method = d.get("quant_method", "gptq")
        if str(method).lower() != "gptq":
            raise GPTQFormatError(f"hf_int4 reads GPTQ checkpoints only; quantization_config has quant_method={method!r}")
        if d.get("is_marlin_format"):  # AutoGPTQ <= 0.7 wrote Marlin-layout tensors (B, s) under quant_method gptq
            raise GPTQFormatError("hf_int4 reads GPTQ checkpoints (qweight, qzeros, scales); this one is serialized in "
                                  "AutoGPTQ's Marlin layout (quantization_config is_marlin_format=true)")
        pack_dtype = d.get("pack_dtype")  # GPTQModel: the word qweight / qzeros are packed into
        if pack_dtype is not None and str(pack_dtype).removeprefix("torch.") != "int32":
            raise GPTQFormatError(f"hf_int4 reads GPTQ tensors packed into int32 words; quantization_config has "
                                  f"pack_dtype={pack_dtype!r}")
        fmt = d.get("checkpoint_format")
        alt = d.get("format")  # GPTQModel's name for the same setting
        if fmt is not None and alt is not None and str(fmt).lower() != str(alt).lower():
            raise GPTQFormatError(f"quantization_config has checkpoint_format={fmt!r} but format={alt!r}")
        fmt = fmt if fmt is not None else alt
        kwargs = {"checkpoint_format": "gptq" if fmt is None else str(fmt).lower()}
        for key in ("bits", "group_size", "sym", "desc_act"):
            if key in d and d[key] is not None:
                kwargs[key] = d[key]
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """What AutoGPTQ / optimum write into config.json["quantization_config"]."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "desc_act": self.desc_act,
            "checkpoint_format": self.checkpoint_format,
        }

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)

    def group_of_rows(self, in_features: int, device="cpu") -> torch.Tensor:
        """The g_idx of a checkpoint without act-order: k // group_size (all 0 for group_size -1)."""
        k = torch.arange(in_features, dtype=torch.int32, device=device)
        return torch.zeros_like(k) if self.group_size == -1 else k // self.group_size


# The settings a `dynamic` rule may change per module that decide how its tensors read; the others it may hold
# (damp_percent, ...) only steered the quantization.
DYNAMIC_SETTINGS = ("bits", "group_size", "sym", "desc_act")


class ModuleRules:
    """Which linear modules of a GPTQ checkpoint are quantized, and with which settings.

    The checkpoint's settings (`base`) hold for every module unless GPTQModel's `dynamic` rules say otherwise:
    {pattern: settings} (or [pattern, settings] pairs), tried in order; the first whose regular expression matches
    the start of the module's name decides. "-:pattern": the module is not quantized; "+:pattern" or "pattern":
    its settings are `base` with the rule's bits / group_size / sym / desc_act. `lm_head` (GPTQModel): the output
    head is quantized too. Where a checkpoint's tensor names are known they say which modules hold GPTQ tensors
    (optimum's `modules_in_block_to_quantize` leaves the others in float); these rules say with which settings."""

    def __init__(self, base: GPTQConfig, dynamic: Optional[dict] = None, lm_head: bool = False):
        self.base, self.lm_head = base, bool(lm_head)
        pairs = list(dynamic.items()) if isinstance(dynamic, dict) else dynamic or []
        if not isinstance(pairs, (list, tuple)) or not all(
                isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str) for pair in pairs):
            raise GPTQFormatError(f"quantization_config dynamic={dynamic!r} must map module patterns to settings")
        self.pairs = []  # the rules as written, in order: [pattern, settings]
        self._rules = []  # (pattern, compiled, settings or None for "-:")
        for pattern, settings in pairs:
            if not isinstance(settings, dict):
                raise GPTQFormatError(f"quantization_config dynamic rule {pattern!r} maps to {settings!r}, not to settings")
            negative = pattern.startswith("-:")
            try:
                regex = re.compile(pattern[2:] if negative or pattern.startswith("+:") else pattern)
            except re.error as exc:
                raise GPTQFormatError(f"quantization_config dynamic rule {pattern!r} is not a regular expression: {exc}") from None
            self.pairs.append([pattern, dict(settings)])
            self._rules.append((pattern, regex, None if negative else settings))

    @classmethod
    def from_dict(cls, d: dict) -> "ModuleRules":
        """From config.json["quantization_config"] or quantize_config.json."""
        return cls(GPTQConfig.from_dict(d), d.get("dynamic"), d.get("lm_head") or False)

    def config_for(self, name: str) -> Optional[GPTQConfig]:
        """Module `name`'s settings; None where a "-:" rule leaves it unquantized. A rule's unsupported settings
        (e.g. bits=8) are refused here, naming the module."""
        for pattern, regex, settings in self._rules:
            if regex.match(name):
                if settings is None:
                    return None
                changed = {key: settings[key] for key in DYNAMIC_SETTINGS if key in settings}
                try:
                    return GPTQConfig.from_dict({**self.base.to_dict(), **changed})
                except GPTQFormatError as exc:
                    raise GPTQFormatError(f"layer {name} (quantization_config dynamic rule {pattern!r}): {exc}") from None
        return self.base

    def stored_config(self, name: str) -> GPTQConfig:
        """The settings of a module the checkpoint holds GPTQ tensors for; a rule that says otherwise is an error."""
        config = self.config_for(name)
        if config is None:
            pattern = next(p for p, regex, _ in self._rules if regex.match(name))
            _fail(name, f"the checkpoint holds it quantized, but quantization_config's dynamic rule {pattern!r} "
                        "says it is not quantized")
        return config


def load_quantization_config(checkpoint_dir) -> dict:
    """config.json's quantization_config, else quantize_config.json (older AutoGPTQ checkpoints)."""
    cfg_path = os.path.join(checkpoint_dir, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            qc = json.load(f).get("quantization_config")
        if qc is not None:
            return qc
    qc_path = os.path.join(checkpoint_dir, "quantize_config.json")
    if os.path.isfile(qc_path):
        with open(qc_path) as f:
            return json.load(f)
    raise GPTQFormatError(
        f"{checkpoint_dir} is not a GPTQ checkpoint: neither config.json has a quantization_config "
        "nor does quantize_config.json exist"
    )


def load_gptq_config(checkpoint_dir) -> GPTQConfig:
    """The checkpoint's GPTQ settings (those of every module without a `dynamic` rule of its own)."""
    return GPTQConfig.from_dict(load_quantization_config(checkpoint_dir))


def load_module_rules(checkpoint_dir) -> ModuleRules:
    """The checkpoint's GPTQ settings per module."""
    return ModuleRules.from_dict(load_quantization_config(checkpoint_dir))


# ---------------------------------------------------------------------------------------------- unpacking


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N] -> int32 [8R, N] in 0..15; row 8r + j is nibble j of row r.

    The arithmetic right shift of a negative word drags in sign bits, but the & 15 keeps only the
    nibble, so words with the top bit set unpack correctly."""
    shifts = _SHIFTS.to(packed.device).view(1, 8, 1)
    return ((packed.unsqueeze(1) >> shifts) & 15).reshape(packed.shape[0] * 8, packed.shape[1])


def unpack_int4_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [G, C] -> int32 [G, 8C] in 0..15; column 8c + j is nibble j of column c."""
    shifts = _SHIFTS.to(packed.device).view(1, 1, 8)
    return ((packed.unsqueeze(2) >> shifts) & 15).reshape(packed.shape[0], packed.shape[1] * 8)


# ------------------------------------------------------------------------------------------------ layer


def as_int32_g_idx(g_idx: torch.Tensor) -> torch.Tensor:
    """An integer g_idx as int32 (checkpoints also store int64); anything else as it is, for validate() to refuse."""
    if g_idx.is_floating_point() or g_idx.dtype in (torch.int32, torch.bool):
        return g_idx
    return g_idx.to(torch.int32)


@dataclass(eq=False)  # tensors have no boolean ==; layers compare by identity
class GPTQLayer:
    name: str
    qweight: torch.Tensor  # int32 [K/8, N]
    qzeros: torch.Tensor  # int32 [G, N/8]
    scales: torch.Tensor  # SCALE_DTYPES [G, N]
    g_idx: torch.Tensor  # int32 [K]
    bias: Optional[torch.Tensor] = None  # [N]
    config: GPTQConfig = GPTQConfig()

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def num_groups(self) -> int:
        return self.config.num_groups(self.in_features)

    def int_weight(self) -> torch.Tensor:
        """int32 [K, N], values 0..15."""
        return unpack_int4_rows(self.qweight)

    def int_zeros(self) -> torch.Tensor:
        """int32 [G, N]: the true zero points.

        v1 adds 1 to the stored nibble without masking, as AutoGPTQ's dequantization and the exllama
        kernels do, so a stored 15 means 16 (and a true zero of 0 cannot be stored at all)."""
        z = unpack_int4_cols(self.qzeros)
        return z + 1 if self.config.checkpoint_format == "gptq" else z

    @classmethod
    def from_tensors(cls, name: str, tensors: Dict[str, torch.Tensor], config: GPTQConfig) -> "GPTQLayer":
        """Build and validate a layer from its checkpoint tensors {qweight, qzeros, scales[, g_idx][, bias]}.

        Scales keep their dtype (fp16, or bf16 / fp32 as some writers store them: packing rounds them once, into the
        activation dtype; converting to fp16 here would flush small bf16 scales and overflow large ones), other float
        scales become fp32; integer g_idx becomes int32;
        a missing g_idx is derived as k // group_size."""
        for key in QUANT_SUFFIXES:
            if key not in tensors:
                present = ", ".join(sorted(tensors)) or "nothing"
                _fail(name, f"the checkpoint has no {name}.{key} (found {present}); a GPTQ layer needs qweight, qzeros and scales")
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        if scales.is_floating_point() and scales.dtype not in SCALE_DTYPES:  # e.g. float64
            scales = scales.float()
        g_idx = tensors.get("g_idx")
        if g_idx is None:
            if qweight.dim() != 2:
                _fail(name, f"qweight must be 2-D [K/8, N], got shape {tuple(qweight.shape)}")
            g_idx = config.group_of_rows(qweight.shape[0] * 8, device=qweight.device)
        else:
            g_idx = as_int32_g_idx(g_idx)
        layer = cls(name, qweight, qzeros, scales, g_idx, tensors.get("bias"), config)
        layer.validate()
        return layer

    def validate(self) -> "GPTQLayer":
        """Raise GPTQFormatError unless the tensors are a well-formed layer of `config`; returns self."""
        name, cfg = self.name, self.config
        for key, dtypes in (("qweight", (torch.int32,)), ("qzeros", (torch.int32,)), ("scales", SCALE_DTYPES),
                            ("g_idx", (torch.int32,))):
            t = getattr(self, key)
            if not isinstance(t, torch.Tensor):
                _fail(name, f"{key} is missing")
            if t.dtype not in dtypes:
                _fail(name, f"{key} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
        if self.qweight.dim() != 2:
            _fail(name, f"qweight must be 2-D [K/8, N], got shape {tuple(self.qweight.shape)}")
        K, N = self.in_features, self.out_features
        G = cfg.num_groups(K)
        if N % 8 != 0:
            _fail(name, f"out_features N={N} (qweight shape {tuple(self.qweight.shape)}) is not a multiple of 8, so qzeros cannot pack it")
        if self.g_idx.shape != (K,):
            extra = " (K must be a multiple of 8: GPTQ packs 8 rows per int32 word)" if self.g_idx.numel() % 8 else ""
            _fail(name, f"g_idx has shape {tuple(self.g_idx.shape)} but qweight shape {tuple(self.qweight.shape)} means K={K}{extra}")
        expect = {"scales": (G, N), "qzeros": (G, N // 8)}
        for key, shape in expect.items():
            got = tuple(getattr(self, key).shape)
            if got != shape:
                _fail(
                    name,
                    f"{key} has shape {got}, expected {shape} for K={K}, N={N}, group_size={cfg.group_size} "
                    f"(G={G} groups; qweight shape {tuple(self.qweight.shape)})",
                )
        if self.bias is not None:
            if not self.bias.is_floating_point():
                _fail(name, f"bias must be a float tensor, got {self.bias.dtype}")
            if tuple(self.bias.shape) != (N,):
                _fail(name, f"bias has shape {tuple(self.bias.shape)}, expected ({N},)")
        devices = {t.device for t in (self.qweight, self.qzeros, self.scales, self.g_idx, self.bias) if t is not None}
        if len(devices) > 1:
            _fail(name, f"tensors are on different devices: {sorted(map(str, devices))}")
        if self.qweight.device.type == "meta":
            return self  # shapes only; there are no values to check yet
        self._validate_values(G)
        return self

    def _validate_values(self, G: int):
        name, cfg = self.name, self.config
        g = self.g_idx
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= G):
            bad = int(((g < 0) | (g >= G)).nonzero()[0])
            _fail(name, f"g_idx[{bad}]={int(g[bad])} is out of range [0, {G}) (G={G} groups, group_size={cfg.group_size})")
        if not cfg.desc_act:
            want = cfg.group_of_rows(self.in_features, device=g.device)
            if not torch.equal(g, want):
                k = int((g != want).nonzero()[0])
                _fail(
                    name,
                    f"desc_act=False but g_idx is not k // group_size (g_idx[{k}]={int(g[k])}, expected {int(want[k])}); "
                    "reordered (static-groups) GPTQ checkpoints without desc_act are not supported",
                )
        if not bool(torch.isfinite(self.scales).all()):
            gi, n = (~torch.isfinite(self.scales)).nonzero()[0].tolist()
            _fail(name, f"scales[{gi}, {n}]={float(self.scales[gi, n])} is not finite")
        if cfg.sym:
            zeros = self.int_zeros()
            mid = 2 ** (cfg.bits - 1)
            if not bool((zeros == mid).all()):
                gi, n = (zeros != mid).nonzero()[0].tolist()
                _fail(
                    name,
                    f"checkpoint says sym=True but qzeros are not the symmetric constant {mid} "
                    f"(found zero {int(zeros[gi, n])} at group {gi}, column {n}; checkpoint_format={cfg.checkpoint_format})",
                )


# ---------------------------------------------------------------------------------------------- reading


def safetensors_files(checkpoint_dir) -> list:
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(checkpoint_dir) if n.endswith(".safetensors"))
    if not names:
        raise GPTQFormatError(f"{checkpoint_dir} holds no *.safetensors files (hf_int4 reads safetensors checkpoints only)")
    return [os.path.join(checkpoint_dir, n) for n in names]


def tensor_shapes(paths) -> Dict[str, Tuple[int, ...]]:
    """{tensor name: shape} of safetensors files, from their headers only (no tensor data is read)."""
    from safetensors import safe_open

    shapes = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def _split(key: str) -> Tuple[str, str]:
    prefix, _, suffix = key.rpartition(".")
    return prefix, suffix


def iter_checkpoint(checkpoint_dir, device, rules: ModuleRules, with_tensors=True) -> Iterator[Tuple[str, str, object]]:
    """Yield ("layer", name, GPTQLayer) and ("tensor", name, Tensor) reading one shard at a time; each layer
    with its own settings (`rules`).

    Headers are read first so that we know every tensor of every layer; a layer is yielded as soon as
    the shard holding its last tensor has been read, so memory stays bounded by about one shard."""
    from safetensors import safe_open

    files = safetensors_files(checkpoint_dir)
    where: Dict[str, str] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in where:
                    raise GPTQFormatError(f"tensor {key} appears in both {where[key]} and {path}")
                where[key] = path
    # A layer is a prefix with a qweight or qzeros (a lone ".scales" may be an ordinary parameter).
    layer_keys: Dict[str, set] = {}
    for key in where:
        prefix, suffix = _split(key)
        if suffix in ("qweight", "qzeros"):
            layer_keys.setdefault(prefix, set())
    for key in where:
        prefix, suffix = _split(key)
        if prefix in layer_keys and suffix in LAYER_SUFFIXES:
            layer_keys[prefix].add(suffix)
        elif suffix == "g_idx":
            raise GPTQFormatError(f"layer {prefix}: the checkpoint has {key} but no {prefix}.qweight")
    configs = {}
    for prefix, suffixes in layer_keys.items():  # fail before reading any data
        missing = [s for s in QUANT_SUFFIXES if s not in suffixes]
        if missing:
            _fail(prefix, f"the checkpoint has {', '.join(sorted(suffixes))} but no {prefix}.{missing[0]}")
        configs[prefix] = rules.stored_config(prefix)

    pending: Dict[str, dict] = {}
    for path in files:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for key in f.keys():
                prefix, suffix = _split(key)
                if prefix in layer_keys and suffix in LAYER_SUFFIXES:
                    pending.setdefault(prefix, {})[suffix] = f.get_tensor(key)
                elif with_tensors:
                    yield "tensor", key, f.get_tensor(key)
        for prefix in [p for p, t in pending.items() if len(t) == len(layer_keys[p])]:
            yield "layer", prefix, GPTQLayer.from_tensors(prefix, pending.pop(prefix), configs[prefix])


def read_gptq_checkpoint(checkpoint_dir, device="cpu"):
    """-> (GPTQConfig, {layer name: GPTQLayer}, {name: Tensor} of every non-quantized tensor); the config is the
    checkpoint's, each layer carries its own (`dynamic` rules)."""
    rules = load_module_rules(checkpoint_dir)
    layers, others = {}, {}
    for kind, name, obj in iter_checkpoint(checkpoint_dir, device, rules):
        (layers if kind == "layer" else others)[name] = obj
    return rules.base, layers, others


def iter_gptq_layers(checkpoint_dir, device="cpu") -> Iterator[GPTQLayer]:
    """Yield the validated quantized layers shard by shard (non-quantized tensors are skipped)."""
    for _, _, layer in iter_checkpoint(checkpoint_dir, device, load_module_rules(checkpoint_dir), with_tensors=False):
        yield layer
