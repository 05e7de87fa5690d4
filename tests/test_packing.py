"""CPU tests of the packed int4 layout (hf_int4.packing).

The expected position of every weight nibble is re-derived here from the layout description (mma
m16n8k16 fragment ownership), independently of the packer's own index helpers."""
import math

import pytest
import torch

from gptq_oracle import weight_from_ints
from hf_int4.formats.gptq import GPTQConfig
from hf_int4.formats.gptq_writer import make_gptq_layer, random_gptq_layer
from hf_int4.packing import (
    PackedInt4Weight,
    act_order_perm,
    dequantize_like_kernel,
    kernel_group_size,
    pack_gptq_layer,
    pack_gptq_layer_cpu,
    padded_sizes,
)

DTYPES = [torch.float16, torch.bfloat16]
MAGIC = {torch.float16: 1024.0, torch.bfloat16: 128.0}


def _layer(K, N, group_size=128, sym=True, desc_act=False, fmt="gptq", seed=0, bias=False):
    cfg = GPTQConfig(group_size=group_size, sym=sym, desc_act=desc_act, checkpoint_format=fmt)
    return random_gptq_layer(K, N, cfg, seed=seed, with_bias=bias)


# ------------------------------------------------------------------------------- independent layout model


def expected_location(k: torch.Tensor, n: torch.Tensor, n_pad: int):
    """Where weight (k, n) lives: (row of qweight, column of qweight, nibble slot).

    CUTLASS's reordered int4 layout for an RS wgmma (A = W^T from registers): the 16 x 16 atom of rows
    16 kb.. and columns 16 a.. is 32 consecutive words, one per lane = 4 g + t, which holds the A
    fragment of W^T: n = g, g + 8 (h = 0, 1), k = 2t, 2t+1 (odd), + 8 (upper); CUTLASS's fragment order
    v = odd + 2 h + 4 upper, shuffled [0,2,4,6,1,3,5,7] into nibbles, puts v at slot 4 odd + 2 upper + h."""
    kb, dk = k // 16, k % 16
    a, dn = n // 16, n % 16
    h, g = dn // 8, dn % 8
    t, odd, upper = (dk % 8) // 2, dk % 2, dk // 8
    lane = 4 * g + t
    col = a * 32 + lane
    v = odd + 2 * h + 4 * upper
    slot = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])[v]  # inverse of the shuffle: nibble s holds v = [0,2,4,6,1,3,5,7][s]
    return kb, col, slot


def nibble_at(qweight, row, col, slot):
    """The weight q (0..15) at a nibble: stored signed, q - 8 in two's complement."""
    return ((qweight[row, col] >> (4 * slot)) & 15) ^ 8


# --------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("K,N", [(128, 128), (576, 1536), (200, 192), (352, 264), (64, 8)])
def test_weight_layout_matches_independent_model(K, N):
    layer, raw = _layer(K, N, group_size=64 if K % 64 == 0 else 32, seed=K + N)
    packed = pack_gptq_layer_cpu(layer, torch.float16)
    k_pad, n_pad = padded_sizes(K, N)
    assert k_pad % 64 == 0 and n_pad % 128 == 0 and k_pad - K < 64 and n_pad - N < 128
    assert tuple(packed.qweight.shape) == (k_pad // 16, n_pad * 2)
    assert packed.qweight.dtype == torch.int32
    kk, nn = torch.meshgrid(torch.arange(k_pad), torch.arange(n_pad), indexing="ij")
    row, col, slot = expected_location(kk, nn, n_pad)
    # the map is a bijection onto the nibbles of qweight
    flat = (row * (n_pad * 2) + col) * 8 + slot
    assert torch.equal(torch.sort(flat.reshape(-1)).values, torch.arange(k_pad * n_pad))
    got = nibble_at(packed.qweight, row, col, slot)
    want = torch.full((k_pad, n_pad), 8, dtype=torch.int32)  # padding weights are q = 8
    want[:K, :N] = raw["intweight"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym", [True, False])
def test_scales_and_zeros_layout(dtype, sym):
    K, N = 352, 264  # K not a multiple of the group size: the last group has 96 rows
    layer, raw = _layer(K, N, group_size=128, sym=sym, fmt="gptq", seed=3)
    packed = pack_gptq_layer_cpu(layer, dtype)
    k_pad, n_pad = padded_sizes(K, N)
    G = math.ceil(K / 128)
    assert packed.group_size == 128 and packed.num_groups == math.ceil(k_pad / 128) == G
    assert packed.scales.dtype == dtype and tuple(packed.scales.shape) == (G, n_pad)
    natural = packed.scales  # natural column order, as CUTLASS's N-major scales
    assert torch.equal(natural[:, :N], raw["scales"].to(dtype))
    assert bool((natural[:, N:] == 0).all())  # padded columns: scale 0
    if sym:
        assert packed.zeros is None and packed.sym
    else:
        assert packed.zeros.dtype == dtype and tuple(packed.zeros.shape) == (G, n_pad)
        zn = packed.zeros.float()
        assert torch.equal(zn[:, :N], raw["zeros"].float() + MAGIC[dtype])  # exact: magic + z
        assert bool((zn[:, N:] == MAGIC[dtype] + 8).all())
        assert int(raw["zeros"].max()) == 16  # v1 asym covers the zero point 16


def test_zero_point_16_and_0_are_exact_in_both_dtypes():
    for dtype, magic in MAGIC.items():
        z = torch.arange(17, dtype=torch.float32)
        assert torch.equal((z + magic).to(dtype).float() - magic, z)


def test_padding_shapes_smollm_like():
    layer, raw = _layer(576, 1536, group_size=128, sym=False, fmt="gptq_v2", seed=5)
    p = pack_gptq_layer_cpu(layer, torch.bfloat16)
    assert (p.k_padded, p.n_padded) == (576, 1536)
    assert tuple(p.qweight.shape) == (36, 3072) and tuple(p.scales.shape) == (5, 1536)
    layer, raw = _layer(1536, 192, group_size=64, seed=6)
    p = pack_gptq_layer_cpu(layer, torch.float16)
    assert (p.k_padded, p.n_padded) == (1536, 256)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1, 48])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("sym,fmt", [(True, "gptq"), (False, "gptq"), (False, "gptq_v2")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantized_packed_matches_oracle(group_size, desc_act, sym, fmt, dtype):
    K, N = (352, 264) if group_size != 48 else (336, 136)
    layer, raw = _layer(K, N, group_size=group_size, sym=sym, desc_act=desc_act, fmt=fmt, seed=11)
    packed = pack_gptq_layer_cpu(layer, dtype)
    W = dequantize_like_kernel(packed).double()
    ref = weight_from_ints(raw)
    err = ((W - ref).norm() / ref.norm()).item()
    assert err < (1e-3 if dtype == torch.float16 else 8e-3), err
    if group_size == 48:
        assert packed.group_size == 16  # re-expressed with repeated scale rows


# ------------------------------------------------------------------------------------------- act-order


def test_act_order_sorts_rows_stably():
    K, N, gs = 256, 128, 64
    layer, raw = _layer(K, N, group_size=gs, sym=False, desc_act=True, seed=7)
    packed = pack_gptq_layer_cpu(layer, torch.float16)
    g = raw["g_idx"].long()
    assert packed.perm is not None and packed.perm.dtype == torch.int32 and packed.act_order
    perm = packed.perm.long()
    assert torch.equal(g[perm], torch.arange(K) // gs)
    # stable: inside a group, rows keep their original order
    for grp in range(K // gs):
        rows = perm[grp * gs:(grp + 1) * gs]
        assert bool((rows[1:] > rows[:-1]).all())
    kk, nn = torch.meshgrid(torch.arange(K), torch.arange(N), indexing="ij")
    row, col, slot = expected_location(kk, nn, 128)
    assert torch.equal(nibble_at(packed.qweight, row, col, slot), raw["intweight"][perm])


def test_trivial_g_idx_gives_no_perm():
    layer, _ = _layer(256, 128, group_size=64, desc_act=False)
    assert pack_gptq_layer_cpu(layer).perm is None
    assert act_order_perm(torch.arange(256, dtype=torch.int32) // 64, 64) is None
    assert act_order_perm(torch.zeros(256, dtype=torch.int32), -1) is None


def test_bad_g_idx_raises_naming_the_layer():
    K, N, gs = 256, 128, 64
    cfg = GPTQConfig(group_size=gs, sym=True, desc_act=True)
    g_idx = torch.arange(K, dtype=torch.int32) // gs
    g_idx[0] = 1  # group 0 now has 63 rows and group 1 has 65: not contiguous groups of 64
    gen = torch.Generator().manual_seed(0)
    intweight = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.full((K // gs, N), 8, dtype=torch.int32)
    scales = torch.rand(K // gs, N, generator=gen).half() + 0.1
    layer = make_gptq_layer("model.layers.3.mlp.down_proj", intweight, zeros, scales, g_idx, cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj"):
        pack_gptq_layer_cpu(layer)
    with pytest.raises(ValueError, match="contiguous groups"):
        pack_gptq_layer(layer)


# ---------------------------------------------------------------------------------------- the dataclass


def test_tensors_roundtrip_and_to():
    layer, raw = _layer(352, 264, group_size=128, sym=False, desc_act=True, seed=9)
    p = pack_gptq_layer_cpu(layer, torch.bfloat16)
    t = p.tensors()
    assert set(t) == {"qweight", "scales", "zeros", "perm"}
    q = PackedInt4Weight.from_tensors(t, in_features=352, out_features=264, group_size=128)
    for name in t:
        assert torch.equal(getattr(q, name), getattr(p, name))
    assert (q.in_features, q.out_features, q.group_size) == (352, 264, 128)
    r = p.to("cpu")
    assert torch.equal(r.qweight, p.qweight) and r.group_size == p.group_size
    sym = pack_gptq_layer_cpu(_layer(256, 128, group_size=-1)[0])
    assert set(sym.tensors()) == {"qweight", "scales"}


@pytest.mark.parametrize("group_size,sym,desc_act", [(128, True, False), (32, False, True), (-1, False, False), (48, True, True)])
def test_empty_and_shapes_match_packed(group_size, sym, desc_act):
    K, N = 352, 264
    layer, _ = _layer(K, N, group_size=group_size, sym=sym, desc_act=desc_act, seed=2)
    p = pack_gptq_layer_cpu(layer, torch.float16)
    e = PackedInt4Weight.empty(K, N, group_size, torch.float16, sym=sym, act_order=p.perm is not None)
    assert {k: tuple(v.shape) for k, v in e.tensors().items()} == {k: tuple(v.shape) for k, v in p.tensors().items()}
    assert {k: v.dtype for k, v in e.tensors().items()} == {k: v.dtype for k, v in p.tensors().items()}
    assert e.group_size == p.group_size == kernel_group_size(group_size)


def test_validate_rejects_wrong_shapes():
    layer, _ = _layer(256, 128)
    t = pack_gptq_layer_cpu(layer).tensors()
    t["scales"] = t["scales"][:1]
    with pytest.raises(ValueError, match="scales has shape"):
        PackedInt4Weight.from_tensors(t, in_features=256, out_features=128, group_size=128)


def test_bf16_scales_outside_fp16_range_pack_exactly_for_bf16_and_are_refused_for_fp16():
    """Some writers store bf16 scales; read as stored, they reach a bf16 layer unrounded (an fp16 detour would flush
    1e-6 and turn 7e4 into inf), and packing for fp16 names the layer whose scale overflows instead of packing inf."""
    from hf_int4.formats.gptq import GPTQLayer
    from hf_int4.formats.gptq_writer import pack_gptq_tensors

    K, N = 64, 32
    cfg = GPTQConfig(group_size=32, sym=False, checkpoint_format="gptq_v2")
    gen = torch.Generator().manual_seed(7)
    raw = {"intweight": torch.randint(0, 16, (K, N), generator=gen), "zeros": torch.randint(0, 16, (2, N), generator=gen),
           "g_idx": torch.arange(K) // 32}
    raw["scales"] = torch.empty(2, N).uniform_(1.0, 2.0, generator=gen).to(torch.bfloat16)
    raw["scales"][0, :8] *= 1e-6  # below fp16's normal range
    raw["scales"][1, 8:16] *= 7e4  # above fp16's largest value
    tensors = pack_gptq_tensors(raw["intweight"], raw["zeros"], raw["scales"], raw["g_idx"], cfg)
    layer = GPTQLayer.from_tensors("model.layers.0.mlp.up_proj", {**tensors, "scales": raw["scales"]}, cfg)
    packed = pack_gptq_layer_cpu(layer, torch.bfloat16)
    # |q - z| <= 15 times a bf16 scale, rounded once to bf16: the float64 product rounded the same way
    assert torch.equal(dequantize_like_kernel(packed), weight_from_ints(raw).to(torch.bfloat16).float())
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj: scale .*scales\[1, 8\].*overflows torch.float16"):
        pack_gptq_layer_cpu(layer, torch.float16)


def test_pack_gptq_layer_on_cpu_equals_cpu_packer():
    layer, _ = _layer(256, 192, group_size=64, sym=False, desc_act=True, seed=4)
    a, b = pack_gptq_layer(layer, torch.float16), pack_gptq_layer_cpu(layer, torch.float16)
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name])


def test_unsupported_dtype():
    layer, _ = _layer(128, 128)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        pack_gptq_layer_cpu(layer, torch.float32)


# -------------------------------------------------------------------- model of the kernel's work split


def _kernel_schedule(k_tiles, n_tiles, par, blocks):
    """The stripe partition of decode_gemm.cuh (init_slice), replayed on the host."""
    total = k_tiles * n_tiles * par
    iters = -(-total // blocks)
    out = []
    for b in range(blocks):
        tile, end = b * iters, min(total, b * iters + iters)
        while tile < end:
            col, row0 = divmod(tile, k_tiles)
            n_it = min(k_tiles - row0, end - tile)
            first_blk, last_blk = (col * k_tiles) // iters, ((col + 1) * k_tiles - 1) // iters
            out.append(dict(block=b, col=col, rows=range(row0, row0 + n_it), count=last_blk - first_blk + 1, idx=last_blk - b))
            tile += n_it
    return out


@pytest.mark.parametrize("k_tiles,n_tiles,par,blocks", [(32, 32, 1, 132), (9, 12, 1, 132), (4, 2, 3, 5), (64, 64, 1, 132), (7, 3, 2, 1), (5, 1, 1, 132), (112, 16, 2, 132)])
def test_stripe_schedule_covers_every_tile_once_with_ordered_reductions(k_tiles, n_tiles, par, blocks):
    sched = _kernel_schedule(k_tiles, n_tiles, par, min(blocks, k_tiles * n_tiles * par))
    seen = torch.zeros(n_tiles * par, k_tiles, dtype=torch.int32)
    by_col = {}
    for s in sched:
        for r in s["rows"]:
            seen[s["col"], r] += 1
        by_col.setdefault(s["col"], []).append(s)
    assert bool((seen == 1).all())
    for col, parts in by_col.items():
        counts = {p["count"] for p in parts}
        assert counts == {len(parts)}
        # slice_idx 0 .. count-1, the bottom-most stripe (highest rows) reduces first
        order = sorted(parts, key=lambda p: p["idx"])
        assert [p["idx"] for p in order] == list(range(len(parts)))
        assert [p["rows"].start for p in order] == sorted((p["rows"].start for p in parts), reverse=True)
        # a block only ever waits on higher blocks, for which this column is their first slice
        for p in parts:
            for q in parts:
                if q["idx"] < p["idx"]:
                    assert q["block"] > p["block"]
                    assert next(s for s in sched if s["block"] == q["block"])["col"] == col
