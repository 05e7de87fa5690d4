"""Which kernel path serves a call of an HfInt4Linear, by M (rows = batch x tokens), shape, dtype and variant.

Each path states what it can run (`unsupported(spec)` gives the reason it cannot, or None) and runs it,
after vLLM's MPLinearKernel; `plan_for(spec, device)` then fixes, once per layer and device, the path for
every range of M:

- from a measured table for this GPU model: a user table written by `hf-int4 tune` (in
  `$HF_INT4_CACHE` or `~/.cache/hf_int4`) first, else the table shipped in `hf_int4/tables/`. A table
  holds, per measured (K, N, dtype), each path's time at a grid of M; the plan serves each M with the fastest
  path the layer supports at the first grid point at or above it (beyond the last point, the last point's). A
  path's time does not fall as M grows, so its time at that point bounds its time over the whole interval; the
  point below bounds nothing (a path of 64-token tiles, fastest at M = 64, runs two tiles at 65). An unmeasured
  shape uses the measured shape closest in weight size;
- else from a rule: the decode kernel up to a crossover M estimated from the GPU's FLOP/byte ratio.

A plan is a tuple of (first M, path) pairs, so the choice per call is a pure function of the input's
shape: no host sync, and torch.compile turns it into guards on M. The plan is logged at DEBUG level
(logger "hf_int4.dispatch") and `explain(layer, m)` returns the choice and why.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from hf_int4.packing import SUPPORTED_DTYPES, PackedInt4Weight

logger = logging.getLogger("hf_int4.dispatch")

SHIPPED_TABLES = Path(__file__).parent / "tables"


# ----------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class LinearSpec:
    """What a path needs to know about a layer to say whether it can run it."""

    in_features: int
    out_features: int
    group_size: int  # the kernel's group size (-1: per channel)
    sym: bool
    act_order: bool
    dtype: torch.dtype

    @classmethod
    def of(cls, packed: PackedInt4Weight) -> "LinearSpec":
        return cls(packed.in_features, packed.out_features, packed.group_size, packed.sym, packed.act_order, packed.dtype)


class KernelPath:
    name = ""
    # The largest M at which this path can be the fastest (None: any). It still runs any M; tune and the benchmark
    # do not time it beyond (the table holds null there) and plans never pick it there.
    max_m: Optional[int] = None

    def unsupported(self, spec: LinearSpec) -> Optional[str]:
        """None when this path can run the layer, else why not."""
        if spec.dtype not in SUPPORTED_DTYPES:
            return f"activations are {spec.dtype}, not float16/bfloat16"
        return None

    def device_unsupported(self, props) -> Optional[str]:
        """None when this path runs on a GPU with these properties (torch.cuda.get_device_properties)."""
        return None

    def run(self, x: torch.Tensor, packed: PackedInt4Weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def run_gated(self, h: torch.Tensor, up_offset: int, packed: PackedInt4Weight,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
        """A gated MLP's down projection on its gate and up projections side by side: the input is
        hf_int4.ops.silu_mul(h, K, up_offset), formed here first."""
        from hf_int4.ops import silu_mul

        return self.run(silu_mul(h, packed.in_features, up_offset), packed, bias)


class DecodePath(KernelPath):
    """The decode kernels (one op): up to 8 rows a streaming kernel, more a Marlin-class tiled one; both read the
    int4 weights once and are the fastest at small M."""

    name = "decode"

    def run(self, x, packed, bias):
        from hf_int4.ops import int4_gemm

        return int4_gemm(x, packed, bias)

    def run_gated(self, h, up_offset, packed, bias):  # the streaming kernel forms silu(gate) * up as it reads h
        from hf_int4.ops import int4_gemm

        return int4_gemm(h, packed, bias, up_offset=up_offset)


class DequantCublasPath(KernelPath):
    """Dequantize into a temporary fp16/bf16 weight, then cuBLAS: pays one extra weight pass, wins at large M."""

    name = "dequant"

    def run(self, x, packed, bias):
        from hf_int4.ops import dequant_linear

        return dequant_linear(x, packed, bias)


PARTIAL_SUM_SCHEDULES = (2, 3, 6, 7, 8, 9, 10, 12)  # split-K into fp32 partials, summed by a second kernel (hf_int4.ops.hopper_linear)
# also built with zero points, for asymmetric layers (csrc/hopper/hopper_gemm.h: the symmetric layers' paths per
# regime of M, not all thirteen, to bound the build)
ZERO_POINT_SCHEDULES = (0, 1, 2, 6, 7, 8)


class HopperPath(KernelPath):
    """CUTLASS's mixed-input wgmma GEMM (TMA + warp-specialised), Hopper only: the compute-bound regime.
    One instance per configuration (tile, scheduler, split-K; hf_int4.ops.hopper_linear); the tables say where
    each wins."""

    def __init__(self, name: str, schedule: int, splits: int = 0, max_m: Optional[int] = None):
        self.name, self.schedule, self.splits, self.max_m = name, schedule, splits, max_m

    def unsupported(self, spec):
        why = super().unsupported(spec)
        if why:
            return why
        if not spec.sym and self.schedule not in ZERO_POINT_SCHEDULES:
            return f"asymmetric weights (zero points): schedule {self.schedule} is built without them"
        if spec.out_features % 128 or spec.in_features % 64:
            return f"needs out_features % 128 == 0 and in_features % 64 == 0, got {spec.out_features}x{spec.in_features}"
        if spec.group_size != -1 and spec.group_size % 64:
            return f"group size {spec.group_size} is below the kernel's K tile (64)"
        if self.schedule in PARTIAL_SUM_SCHEDULES:
            K, group = spec.in_features, spec.group_size
            if group == -1:
                return "per-channel scales: the K-slices would all read one scale row (not wired)"
            if K % (64 * self.splits) or (K // self.splits) % group:
                return f"K={K} does not cut into {self.splits} slices of whole 64-row tiles and groups of {group}"
        return None

    def device_unsupported(self, props):
        from hf_int4._extension import hopper_available

        if (props.major, props.minor) != (9, 0):
            return f"needs sm_90 (Hopper), this GPU is sm_{props.major}{props.minor}"
        if not hopper_available():
            return "hf_int4._hopper was not built (CUTLASS headers or sm_90 missing at install)"
        return None

    def run(self, x, packed, bias):
        from hf_int4.ops import hopper_linear

        return hopper_linear(x, packed, bias, self.schedule, self.splits)


PATHS: Dict[str, KernelPath] = {
    p.name: p
    for p in (DecodePath(), DequantCublasPath(), HopperPath("hopper", 0), HopperPath("hopper_wide", 1),
              # the same tiles split along K, every K-slice at once, then a sum: layers with few tiles
              HopperPath("hopper_partials2", 2, 2), HopperPath("hopper_partials4", 2, 4),
              # 64-token tiles: half the MMA work of a 128-token tile at M <= 64, and twice the tiles
              HopperPath("hopper_narrow_partials2", 3, 2), HopperPath("hopper_narrow_partials4", 3, 4),
              # 192-token tiles: no padding rows at M = 192 * j, a wave count between 128- and 256-token tiles'
              HopperPath("hopper_192", 4),
              # 256-token tiles in clusters of two along the weights: the pair reads each activation tile once
              HopperPath("hopper_wide_cluster", 5),
              # 256 weight rows per tile (128 per warpgroup), 64, 32 or 16 tokens: twice the weights per latency-bound
              # k-block at M <= 64; beyond 128 rows (16-token tiles: 16) they only repeat the weight reads per token tile
              *(HopperPath(f"hopper_w256{suffix}_partials{s}", schedule, s, max_m=max_m)
                for suffix, schedule, max_m in (("", 6, 128), ("_t32", 7, 128), ("_t16", 8, 16)) for s in (2, 4, 8)),
              # 160-token tiles (m64n160k16): no padding rows at M = 160 j, where on the H200 they beat every other
              # path by 4-18% (docs/kernel_notes.md step 30); measured at every M, the tune decides
              HopperPath("hopper_160", 11),
              # M = 160..1280: 160-, 192- and 256-token tiles, which cover M in one or two passes and keep the tensor
              # pipe busier than 128-token tiles, split along K where a layer has too few weight tiles for the SMs
              *(HopperPath(f"hopper_{tile}_partials{s}", schedule, s, max_m=1280)
                for tile, schedule in (("160", 12), ("192", 9), ("wide", 10)) for s in (2, 4)))
}


# ----------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """The path for every M of one layer on one GPU model: `steps` = ((first M, path name), ...), ascending."""

    steps: Tuple[Tuple[int, str], ...]
    source: str  # where the thresholds came from, for explain() and logs

    def path_name(self, m: int) -> str:
        name = self.steps[0][1]
        for first_m, step_name in self.steps[1:]:
            if m >= first_m:
                name = step_name
        return name

    def path(self, m: int) -> KernelPath:
        return PATHS[self.path_name(m)]

    def describe(self) -> str:
        parts = []
        for i, (first_m, name) in enumerate(self.steps):
            last = self.steps[i + 1][0] - 1 if i + 1 < len(self.steps) else None
            parts.append(f"{name} for M {first_m}..{last if last is not None else ''}")
        return ", ".join(parts) + f" ({self.source})"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia_h100_80gb_hbm3' (table file names)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def user_table_dir() -> Path:
    return Path(os.environ.get("HF_INT4_CACHE", Path.home() / ".cache" / "hf_int4")) / "tables"


def table_path_for(device_name: str) -> Optional[Path]:
    """The table used for a GPU model: the user's tuned one, else the shipped one, else None."""
    slug = device_slug(device_name)
    for directory in (user_table_dir(), SHIPPED_TABLES):
        path = directory / f"{slug}.json"
        if path.is_file():
            return path
    return None


def load_table(path) -> dict:
    """A dispatch table read from `path`; ValueError naming the file where it is not valid JSON or not a table (no
    entries, an entry without k / n / dtype / m / us, times not one per M)."""
    try:
        table = json.loads(Path(path).read_text())
        if not isinstance(table, dict) or not isinstance(table.get("entries"), list) or not table["entries"]:
            raise ValueError("it holds no entries")
        for e in table["entries"]:
            missing = {"k", "n", "dtype", "m", "us"} - set(e)
            if missing:
                raise ValueError(f"an entry lacks {', '.join(sorted(missing))}")
            if any(len(times) != len(e["m"]) for times in e["us"].values()):
                raise ValueError(f"entry {e['k']}x{e['n']} {e['dtype']}: not one time per M")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"hf_int4 dispatch table {path} cannot be used ({type(exc).__name__}: {exc}); fix or delete "
                         "it (`hf-int4 tune` writes a new one)") from exc
    return table


def _nearest_entry(entries: Sequence[dict], spec: LinearSpec) -> dict:
    dtype = str(spec.dtype).replace("torch.", "")
    same_dtype = [e for e in entries if e["dtype"] == dtype] or list(entries)
    size = math.log(spec.in_features * spec.out_features)
    # weight size decides the crossover first; the K:N aspect breaks ties; among entries of one shape, the layer's
    # variant (an entry without "sym" was measured on symmetric weights), then its group size
    return min(
        same_dtype,
        key=lambda e: (abs(math.log(e["k"] * e["n"]) - size),
                       abs(math.log(e["k"] / e["n"]) - math.log(spec.in_features / spec.out_features)),
                       e.get("sym", True) != spec.sym, e.get("group_size") != spec.group_size),
    )


def plan_from_table(table: dict, spec: LinearSpec, source: str, usable_here: Sequence[str] = tuple(PATHS)) -> Plan:
    entry = _nearest_entry(table["entries"], spec)
    usable = [name for name in entry["us"]
              if name in PATHS and name in usable_here and PATHS[name].unsupported(spec) is None]
    if not usable:
        raise ValueError(f"{source}: no measured path can run this layer")
    steps: List[Tuple[int, str]] = []
    previous_m = 0
    for i, m in enumerate(entry["m"]):
        timed = [name for name in usable if entry["us"][name][i] is not None]  # null: not timed at this M (max_m)
        if not timed:
            raise ValueError(f"{source}: no usable path was timed at M = {m}")
        best = min(timed, key=lambda name: entry["us"][name][i])
        if not steps or steps[-1][1] != best:
            steps.append((previous_m + 1, best))  # serves previous_m + 1 .. m (module docstring)
        previous_m = m
    # beyond the last grid point the last point's path serves, unless it has a max_m (KernelPath.max_m: never
    # planned beyond it): from there on the fastest path there without one
    last_max_m = PATHS[steps[-1][1]].max_m
    unbounded = [name for name in usable if PATHS[name].max_m is None and entry["us"][name][-1] is not None]
    if last_max_m is not None and unbounded:
        steps.append((max(last_max_m, previous_m) + 1, min(unbounded, key=lambda name: entry["us"][name][-1])))
    where = f"{source}, entry {entry['k']}x{entry['n']} {entry['dtype']}"
    return Plan(tuple(steps), where)


# The decode kernel runs its mma.sync at about 0.45x of cuBLAS's GEMM rate; dequantize-then-cuBLAS pays
# ~4.5 bytes per weight of traffic (read int4 + write and read back fp16) before cuBLAS. Equating the two
# gives a crossover M proportional to the GPU's FLOP/byte ratio; the factor is the H100's measured
# crossover divided by its ratio.
_CROSSOVER_PER_FLOP_PER_BYTE = 0.8  # H100: FLOP/byte ~320 (props), measured crossover 192-384
_TENSOR_FLOPS_PER_SM_PER_CLOCK = {8: 2048, 9: 4096}  # dense fp16 with fp32 accumulation (A100 / H100 class)


def rule_crossover(props) -> int:
    """Default decode -> dequant crossover M for a GPU without a table, from its FLOP/byte ratio."""
    per_clock = _TENSOR_FLOPS_PER_SM_PER_CLOCK.get(props.major, 1024)
    if props.major == 8 and props.minor > 0:
        per_clock = 1024  # consumer Ampere / Ada: half the A100's tensor rate per SM
    flops = props.multi_processor_count * props.clock_rate * 1e3 * per_clock
    bandwidth = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8
    ratio = flops / bandwidth if bandwidth > 0 else 300.0
    return int(min(1024, max(32, 2 ** round(math.log2(_CROSSOVER_PER_FLOP_PER_BYTE * ratio)))))


def plan_for(spec: LinearSpec, device: torch.device) -> Plan:
    """The plan of a layer on a CUDA device (file access: call outside compiled regions, e.g. at load)."""
    if device.type != "cuda":
        raise ValueError(f"hf_int4 dispatch plans GPU paths; got device {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    usable = [p.name for p in PATHS.values() if p.unsupported(spec) is None and p.device_unsupported(props) is None]
    if not usable:
        raise ValueError(f"no hf_int4 GPU path can run this layer: {PATHS['decode'].unsupported(spec)}")
    path = table_path_for(props.name)
    if path is not None:
        return plan_from_table(load_table(path), spec, f"table {path}", usable)
    crossover = rule_crossover(props)
    large = "hopper" if "hopper" in usable else "dequant"
    steps = ((1, "decode"), (crossover, large))
    steps = tuple(s for s in steps if s[1] in usable) or ((1, usable[0]),)
    return Plan(tuple((1 if i == 0 else m, n) for i, (m, n) in enumerate(steps)),
                f"rule for {props.name}: no table, crossover from its FLOP/byte ratio")


@dataclass(frozen=True)
class Choice:
    path: str
    reason: str


def explain(layer, m: int) -> Choice:
    """Which path an HfInt4Linear takes for an input of m rows (in the model's dtype, not followed by autograd), and
    why: "reference" where no GPU path serves it."""
    why = layer.reference_path_reason()
    if why is not None:
        return Choice("reference", f"{layer.name}: {why}")
    plan = layer.dispatch_plan()
    fused = f" (as part of {layer._fused_into[0].name}, one GEMM)" if layer._fused_into is not None else ""
    return Choice(plan.path_name(m), f"M={m}{fused}: {plan.describe()}")
