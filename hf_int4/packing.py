"""The one packed int4 layout of hf_int4's GEMM kernel, and the packers that produce it from GPTQ layers.

Sizes: K = in_features, N = out_features, K_pad = round_up(K, 64), N_pad = round_up(N, 128).

qweight, int32 [K_pad / 16, N_pad * 2]
    CUTLASS's reordered int4 layout for Hopper's mixed-input wgmma (`compute_memory_reordering_atom` of a
    bf16/fp16 RS GMMA with the value shuffle [0,2,4,6,1,3,5,7], tiled over (N_pad, K_pad) with the 16 x 16
    atoms of one k-block consecutive along N), so the decode kernel and the Hopper kernel read the same
    bytes. Row kb holds the 16-row k-block kb as N_pad / 16 atoms of 32 words (128 bytes); word (kb, a,
    lane) is at column 32 a + lane and holds the 8 weights lane `lane` of a warp needs of the 16 x 16 tile
    of columns 16 a ..: as the A operand of W^T (wgmma from registers, "swap AB") or as two B operands of
    mma.m16n8k16 (the decode kernel). With g = lane // 4, t = lane % 4, the nibble at bits 4 s .. 4 s + 3,
    s = 4 * odd + 2 * upper + h, is the weight at

        k = 16 kb + 2 t + odd + 8 upper,        n = 16 a + 8 h + g

    stored as a signed int4 (q - 8, two's complement: the nibble q ^ 8), CUTLASS's int4b_t. (Nibbles s
    and s + 4 are the (k, k + 1) pair of one column: `(word >> 4 h) & 0x000f000f` is the pair k = 2t, 2t+1
    of column 8 h + g and `(word >> 4 h + 8) & 0x000f000f` the pair k = 2t+8, 2t+9.)
scales, [G_pad, N_pad] in the activation dtype; zeros (asymmetric only) the same shape and dtype
    Natural column order (N-major, as CUTLASS's mixed-input GEMM reads them). zeros hold magic + z (fp16:
    1024 + z, bf16: 128 + z, both exact for z in 0..16), so that the kernel's (q | magic) - zero is
    q - z exactly. Symmetric weights (z = 8 everywhere) store no zeros.
group_size
    The kernel's group size: -1 (one group; G_pad = 1) or a power of two >= 16 (G_pad =
    ceil(K_pad / group_size)). A checkpoint group size that is not a power of two (48, 96, ...) is
    re-expressed with its largest power-of-two divisor by repeating scale rows.
perm, int32 [K] or None (act-order)
    Packed row i is GPTQ row perm[i] (a stable sort of g_idx, so that packed row i is in group
    i // group_size); the kernel's caller gathers x[:, perm] first.
Padding: weights q = 8 (nibble 0), scales 0, zeros magic + 8. The kernel zero-fills A beyond K and never
    writes C beyond N, so the padding never reaches the output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

PAD_K = 64  # K_pad multiple (smallest thread_k tile)
PAD_N = 128  # N_pad multiple (smallest thread_n tile)
_MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}
SUPPORTED_DTYPES = tuple(_MAGIC)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def padded_sizes(in_features: int, out_features: int) -> Tuple[int, int]:
    """(K_pad, N_pad) of the packed layout."""
    return _round_up(in_features, PAD_K), _round_up(out_features, PAD_N)


def kernel_group_size(group_size: int) -> int:
    """The group size the kernel runs with for a checkpoint group size: -1, or its largest power-of-two divisor."""
    if group_size == -1:
        return -1
    if group_size <= 0 or group_size % 16:
        raise ValueError(f"group_size must be -1 or a positive multiple of 16, got {group_size}")
    return group_size & -group_size


def packed_num_groups(in_features: int, group_size: int) -> int:
    """G_pad: rows of the packed scales / zeros for a kernel group size."""
    k_pad, _ = padded_sizes(in_features, 8)
    return 1 if group_size == -1 else math.ceil(k_pad / group_size)


def _check_dtype(dtype):
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"hf_int4 packs for float16 or bfloat16 activations, got {dtype}")


def magic_zero(dtype: torch.dtype) -> float:
    _check_dtype(dtype)
    return _MAGIC[dtype]


def zeros_for_dtype(zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed zeros (magic + z for their own dtype) re-expressed for `dtype`, in float32 (exact)."""
    return zeros.float() - magic_zero(zeros.dtype) + magic_zero(dtype)


# ------------------------------------------------------------------------------------------ layout maps


def _nibble_coords() -> Tuple[torch.Tensor, torch.Tensor]:
    """(dk, dn) int64 [32 lanes, 8 nibble slots]: position of each nibble of an atom inside its 16 x 16 tile."""
    lane = torch.arange(32).view(32, 1)
    slot = torch.arange(8).view(1, 8)
    g, t = lane // 4, lane % 4
    odd, upper, h = slot // 4, (slot // 2) % 2, slot % 2
    dk = 2 * t + odd + 8 * upper
    dn = 8 * h + g
    return torch.broadcast_tensors(dk, dn)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int_weight(w: torch.Tensor) -> torch.Tensor:
    """Padded int weights [K_pad, N_pad] (values 0..15, any int dtype) -> packed int32 [K_pad / 16, N_pad * 2]."""
    k_pad, n_pad = w.shape
    if k_pad % 16 or n_pad % 16:
        raise ValueError(f"pack_int_weight needs K and N multiples of 16, got {tuple(w.shape)}")
    dk, dn = _nibble_coords()
    idx = (dk * 16 + dn).reshape(-1).to(w.device)
    # [kb, a, 16 k, 16 n] atoms -> [kb, a, 32 lanes, 8 slots], stored as signed int4 (q ^ 8)
    tiles = (w.to(torch.uint8) ^ 8).reshape(k_pad // 16, 16, n_pad // 16, 16).permute(0, 2, 1, 3)
    nib = tiles.reshape(k_pad // 16, n_pad // 16, 256)[:, :, idx].reshape(k_pad // 16, n_pad // 16, 32, 8)
    words = torch.zeros(nib.shape[:-1], dtype=torch.int64, device=w.device)
    for s in range(8):
        words |= nib[..., s].to(torch.int64) << (4 * s)
    return _to_int32(words).reshape(k_pad // 16, n_pad * 2)


def unpack_int_weight(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int_weight (debugging / test helper): int32 [K_pad / 16, N_pad * 2] -> int32 [K_pad, N_pad]."""
    kb, cols = qweight.shape
    n_pad = cols // 2
    dk, dn = _nibble_coords()
    idx = (dk * 16 + dn).reshape(-1).to(qweight.device)
    words = qweight.reshape(kb, n_pad // 16, 32, 1)
    nib = ((words >> (4 * torch.arange(8, device=qweight.device, dtype=torch.int32))) & 15) ^ 8  # [kb, a, 32, 8]
    tiles = torch.empty(kb, n_pad // 16, 256, dtype=torch.int32, device=qweight.device)
    tiles[:, :, idx] = nib.reshape(kb, n_pad // 16, 256)
    return tiles.reshape(kb, n_pad // 16, 16, 16).permute(0, 2, 1, 3).reshape(kb * 16, n_pad)


# ------------------------------------------------------------------------------------------- the weight


@dataclass
class PackedInt4Weight:
    """A GPTQ linear in the kernel layout (see the module docstring). Tensors live on one device."""

    qweight: torch.Tensor  # int32 [K_pad / 16, N_pad * 2]
    scales: torch.Tensor  # act dtype [G_pad, N_pad], permuted columns
    zeros: Optional[torch.Tensor]  # act dtype [G_pad, N_pad] (magic + z), permuted; None: symmetric
    perm: Optional[torch.Tensor]  # int32 [K] (act-order) or None
    in_features: int
    out_features: int
    group_size: int  # the kernel's group size: -1 or a power of two >= 16

    TENSOR_NAMES = ("qweight", "scales", "zeros", "perm")

    @property
    def k_padded(self) -> int:
        return padded_sizes(self.in_features, self.out_features)[0]

    @property
    def n_padded(self) -> int:
        return padded_sizes(self.in_features, self.out_features)[1]

    @property
    def num_groups(self) -> int:
        return packed_num_groups(self.in_features, self.group_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def sym(self) -> bool:
        return self.zeros is None

    @property
    def act_order(self) -> bool:
        return self.perm is not None

    def to(self, device) -> "PackedInt4Weight":
        def mv(t):
            return None if t is None else t.to(device)

        return PackedInt4Weight(
            mv(self.qweight), mv(self.scales), mv(self.zeros), mv(self.perm), self.in_features, self.out_features, self.group_size
        )

    def tensors(self) -> Dict[str, torch.Tensor]:
        """{name: tensor} of the tensors that exist (zeros / perm are left out when None); for buffers / state dicts."""
        return {name: getattr(self, name) for name in self.TENSOR_NAMES if getattr(self, name) is not None}

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], *, in_features: int, out_features: int, group_size: int) -> "PackedInt4Weight":
        """Rebuild from tensors() (e.g. a loaded state dict); group_size may be the checkpoint's group size."""
        missing = [n for n in ("qweight", "scales") if n not in tensors]
        if missing:
            raise ValueError(f"PackedInt4Weight.from_tensors: missing {missing} (got {sorted(tensors)})")
        w = cls(
            tensors["qweight"], tensors["scales"], tensors.get("zeros"), tensors.get("perm"),
            int(in_features), int(out_features), kernel_group_size(int(group_size)),
        )
        return w.validate()

    @staticmethod
    def shapes(in_features: int, out_features: int, group_size: int, *, sym: bool = True, act_order: bool = False) -> Dict[str, Tuple[int, ...]]:
        """Shapes of tensors() for a layer, without packing anything (to pre-allocate buffers)."""
        k_pad, n_pad = padded_sizes(in_features, out_features)
        g = packed_num_groups(in_features, kernel_group_size(group_size))
        out = {"qweight": (k_pad // 16, n_pad * 2), "scales": (g, n_pad)}
        if not sym:
            out["zeros"] = (g, n_pad)
        if act_order:
            out["perm"] = (in_features,)
        return out

    @classmethod
    def empty(cls, in_features: int, out_features: int, group_size: int, dtype: torch.dtype, *, sym: bool = True,
              act_order: bool = False, device="meta") -> "PackedInt4Weight":
        """Uninitialised tensors of the right shapes (e.g. on the meta device before loading a state dict)."""
        magic_zero(dtype)
        shp = cls.shapes(in_features, out_features, group_size, sym=sym, act_order=act_order)
        return cls(
            torch.empty(shp["qweight"], dtype=torch.int32, device=device),
            torch.empty(shp["scales"], dtype=dtype, device=device),
            torch.empty(shp["zeros"], dtype=dtype, device=device) if not sym else None,
            torch.empty(shp["perm"], dtype=torch.int32, device=device) if act_order else None,
            in_features, out_features, kernel_group_size(group_size),
        )

    def validate(self) -> "PackedInt4Weight":
        """Raise ValueError unless shapes / dtypes / devices agree with the layout."""
        K, N, gs = self.in_features, self.out_features, self.group_size
        if K <= 0 or K % 8 or N <= 0 or N % 8:
            raise ValueError(f"PackedInt4Weight: in_features={K} and out_features={N} must be positive multiples of 8")
        if gs != -1 and (gs < 16 or gs & (gs - 1)):
            raise ValueError(f"PackedInt4Weight: group_size must be -1 or a power of two >= 16, got {gs}")
        magic_zero(self.scales.dtype)
        want = self.shapes(K, N, gs, sym=self.zeros is None, act_order=self.perm is not None)
        for name, t in self.tensors().items():
            if tuple(t.shape) != want[name]:
                raise ValueError(f"PackedInt4Weight: {name} has shape {tuple(t.shape)}, expected {want[name]} "
                                 f"for in_features={K}, out_features={N}, group_size={gs}")
            if t.device != self.qweight.device:
                raise ValueError(f"PackedInt4Weight: {name} is on {t.device} but qweight is on {self.qweight.device}")
        for name, dtype in (("qweight", torch.int32), ("perm", torch.int32), ("zeros", self.scales.dtype)):
            t = getattr(self, name)
            if t is not None and t.dtype != dtype:
                raise ValueError(f"PackedInt4Weight: {name} must be {dtype}, got {t.dtype}")
        return self


# ------------------------------------------------------------------------------------------- packers


def act_order_perm(g_idx: torch.Tensor, group_size: int, name: str = "") -> Optional[torch.Tensor]:
    """Stable sort of the rows by group, int32 [K]; None when that is the identity.

    Raises ValueError (naming the layer) unless, after sorting, row i is in group i // group_size, which
    is what a kernel with contiguous groups needs."""
    K = g_idx.numel()
    if group_size == -1:
        return None
    g = g_idx.to(torch.int64)
    perm = torch.argsort(g, stable=True)
    want = torch.arange(K, device=g.device) // group_size
    got = g[perm]
    if not torch.equal(got, want):
        i = int((got != want).nonzero()[0])
        counts = torch.bincount(g, minlength=int(want[-1]) + 1) if K else g
        raise ValueError(
            f"layer {name or '?'}: g_idx cannot be sorted into contiguous groups of {group_size} rows "
            f"(after a stable sort, row {i} is in group {int(got[i])}, expected {int(want[i])}; rows per group: "
            f"{counts.tolist()[:8]}{' ...' if counts.numel() > 8 else ''})"
        )
    if torch.equal(perm, torch.arange(K, device=g.device)):
        return None
    return perm.to(torch.int32)


def _group_params(layer, dtype: torch.dtype, device) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
    """(scales, zeros or None, kernel group size): padded, expanded to the kernel group size, permuted."""
    magic = magic_zero(dtype)
    K, N = layer.in_features, layer.out_features
    k_pad, n_pad = padded_sizes(K, N)
    gs = layer.config.group_size
    kgs = kernel_group_size(gs)
    g_pad = packed_num_groups(K, kgs)
    if gs == -1:
        src = torch.zeros(1, dtype=torch.int64)
        valid = torch.ones(1, dtype=torch.bool)
    else:
        start = torch.arange(g_pad) * kgs
        valid = start < K
        src = torch.where(valid, start // gs, 0)
    src, valid = src.to(device), valid.to(device)
    scales = torch.zeros(g_pad, n_pad, dtype=torch.float32, device=device)
    scales[:, :N] = torch.where(valid[:, None], layer.scales.to(device).float()[src], 0.0)
    scales = scales.to(dtype).contiguous()
    # finite as read (GPTQLayer.validate): only a wider-ranged dtype (bf16 / fp32 into fp16) can overflow, and the
    # common fp16 checkpoint pays no device sync per layer for the check
    wider = torch.finfo(layer.scales.dtype).max > torch.finfo(dtype).max
    if wider and not bool(torch.isfinite(scales).all()):
        g, n = (~torch.isfinite(scales)).nonzero()[0].tolist()
        raise ValueError(f"layer {layer.name}: scale {layer.scales[src[g], n].item():g} (scales[{int(src[g])}, {n}], "
                         f"{layer.scales.dtype}) overflows {dtype}; load the model in a dtype that holds it")
    zeros = None
    if not layer.config.sym:
        z = torch.full((g_pad, n_pad), 8.0, dtype=torch.float32, device=device)
        z[:, :N] = torch.where(valid[:, None], layer.int_zeros().to(device).float()[src], 8.0)
        zeros = (z + magic).to(dtype).contiguous()
    return scales, zeros, kgs


def pack_gptq_layer_cpu(layer, dtype: torch.dtype = torch.float16) -> PackedInt4Weight:
    """Pack a GPTQLayer into the kernel layout with plain torch on the CPU (the reference packer)."""
    _check_dtype(dtype)
    cpu = torch.device("cpu")
    K, N = layer.in_features, layer.out_features
    k_pad, n_pad = padded_sizes(K, N)
    perm = act_order_perm(layer.g_idx.to(cpu), layer.config.group_size, layer.name)
    w = layer.int_weight().to(cpu)
    if perm is not None:
        w = w[perm.long()]
    padded = torch.full((k_pad, n_pad), 8, dtype=torch.uint8)
    padded[:K, :N] = w.to(torch.uint8)
    scales, zeros, kgs = _group_params(layer, dtype, cpu)
    return PackedInt4Weight(pack_int_weight(padded), scales, zeros, perm, K, N, kgs).validate()


def pack_gptq_layer(layer, dtype: torch.dtype = torch.float16) -> PackedInt4Weight:
    """Pack a GPTQLayer on its own device: the GPU repack kernel for CUDA layers (when the extension is
    built), else the CPU packer (whose result is moved back to the layer's device)."""
    _check_dtype(dtype)
    from hf_int4._extension import extension_available

    device = layer.qweight.device
    if device.type != "cuda" or not extension_available():
        return pack_gptq_layer_cpu(layer, dtype).to(device)
    K, N = layer.in_features, layer.out_features
    perm = act_order_perm(layer.g_idx, layer.config.group_size, layer.name)
    qweight = torch.ops.hf_int4.repack_gptq(layer.qweight.contiguous(), perm, K, N)
    scales, zeros, kgs = _group_params(layer, dtype, device)
    return PackedInt4Weight(qweight, scales, zeros, perm, K, N, kgs).validate()


# ------------------------------------------------------------------------------------------ unpacking


def unpack_to_int_weight(packed: PackedInt4Weight) -> Dict[str, Optional[torch.Tensor]]:
    """Undo the packing (for the CPU path of packed checkpoints, hf_int4.reference.dequantize_packed, and tests).

    Returns intweight int32 [K, N] (in GPTQ row order, i.e. with act-order undone), zeros int32 [G_pad, N]
    (true zero points; all 8 when symmetric), scales float32 [G_pad, N] and the row -> group map
    int64 [K] of the packed groups."""
    K, N = packed.in_features, packed.out_features
    w_sorted = unpack_int_weight(packed.qweight)[:K, :N]
    scales = packed.scales.float()[:, :N]
    if packed.zeros is None:
        zeros = torch.full_like(scales, 8, dtype=torch.int32)
    else:
        zeros = (packed.zeros.float()[:, :N] - magic_zero(packed.dtype)).round().to(torch.int32)
    rows = torch.arange(K, device=scales.device)
    group_sorted = torch.zeros_like(rows) if packed.group_size == -1 else rows // packed.group_size
    intweight = torch.empty_like(w_sorted)
    group = torch.empty_like(group_sorted)
    if packed.perm is None:
        intweight, group = w_sorted, group_sorted
    else:
        p = packed.perm.long()
        intweight[p] = w_sorted
        group[p] = group_sorted
    return {"intweight": intweight, "zeros": zeros, "scales": scales, "group": group}


def dequantize_like_kernel(packed: PackedInt4Weight) -> torch.Tensor:
    """TEST HELPER: float32 [K, N] weight that the kernel multiplies by (x @ W, GPTQ row order); unlike
    hf_int4.reference.dequantize_packed (exact fp32), it rounds to the activation dtype as the kernel does.

    The scale is applied in the activation dtype, exactly as the kernel does: ((q - z) * s) rounded."""
    u = unpack_to_int_weight(packed)
    g = u["group"]
    q = (u["intweight"] - u["zeros"][g]).to(packed.dtype)
    return (q * u["scales"].to(packed.dtype)[g]).float()
