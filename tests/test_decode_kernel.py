"""GPU tests of the int4 GEMM (torch.ops.hf_int4.int4_gemm) and the GPU repack.

The oracle is float64 math on the unpacked GPTQ integers returned by the fixture writer:
    W = scales[g_idx] * (intweight - zeros[g_idx]),  ref = x @ W (+ bias)

Run `python tests/test_decode_kernel.py` for a diagnostic table (errors per variant / tile / M), and
`python tests/test_decode_kernel.py --bench [--sweep]` for timings against fp16 cuBLAS.
"""
import itertools
import math
import sys

import pytest
import torch

from hf_int4._extension import extension_available

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not extension_available(),
    reason="needs a CUDA GPU and the built hf_int4._C extension",
)

from gptq_oracle import oracle, weight_from_ints  # noqa: E402
from hf_int4 import ops  # noqa: E402
from hf_int4.formats.gptq import GPTQConfig  # noqa: E402
from hf_int4.formats.gptq_writer import make_gptq_layer, random_gptq_layer  # noqa: E402
from hf_int4.packing import PackedInt4Weight, dequantize_like_kernel, pack_gptq_layer, pack_gptq_layer_cpu  # noqa: E402

F16, BF16 = torch.float16, torch.bfloat16
DTYPES = [F16, BF16]
TOL = {F16: 2e-3, BF16: 1.5e-2}
M_ALL = [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 33, 64, 65, 127, 128, 129, 1000]
TILES = [(128, 128), (256, 64), (128, 64)]  # (thread_n, thread_k)
VARIANTS = list(itertools.product(["gptq", "gptq_v2"], [True, False], [False, True], [32, 64, 128, -1]))  # fmt, sym, desc_act, gs


def _cfg(fmt="gptq", sym=True, desc_act=False, gs=128):
    return GPTQConfig(group_size=gs, sym=sym, desc_act=desc_act, checkpoint_format=fmt)


_LAYERS = {}
_PACKED = {}


def get_layer(K, N, cfg, *, bias=False, seed=0):
    key = (K, N, cfg, bias, seed)
    if key not in _LAYERS:
        _LAYERS[key] = random_gptq_layer(K, N, cfg, seed=seed, with_bias=bias, device="cuda")
    return _LAYERS[key]


def get_packed(K, N, cfg, dtype, *, bias=False, seed=0):
    key = (K, N, cfg, dtype, bias, seed)
    if key not in _PACKED:
        layer, _ = get_layer(K, N, cfg, bias=bias, seed=seed)
        _PACKED[key] = pack_gptq_layer(layer, dtype)
    return _PACKED[key]


def poison_allocator(nbytes, device="cuda", copies=4):
    """Leave NaN-filled blocks of about `nbytes` in the caching allocator, so that a fresh output buffer
    most likely starts as NaN: every element the kernel fails to write then shows up."""
    bufs = [torch.full((max(nbytes // 2, 1),), float("nan"), dtype=F16, device=device) for _ in range(copies)]
    del bufs


def run(x, packed, bias=None, **kw):
    poison_allocator(x[..., :1].numel() * packed.out_features * 2)
    return ops.int4_gemm(x, packed, bias, **kw)


def check(out, ref, dtype, ctx=""):
    """Relative Frobenius error below TOL[dtype], no NaN; on failure, say where the errors are."""
    out2 = out.reshape(-1, out.shape[-1]).double()
    ref2 = ref.reshape(-1, ref.shape[-1]).double()
    assert out.shape == ref.shape, f"{ctx}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(out2)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        rows, cols = bad[:, 0].unique(), bad[:, 1].unique()
        pytest.fail(
            f"{ctx}: {bad.shape[0]} non-finite outputs (unwritten or overflow); rows {rows[:10].tolist()}"
            f"{'...' if rows.numel() > 10 else ''} ({rows.numel()} rows), cols {cols[:10].tolist()}"
            f"{'...' if cols.numel() > 10 else ''} ({cols.numel()} cols)"
        )
    err = ((out2 - ref2).norm() / ref2.norm().clamp_min(1e-30)).item()
    if not err < TOL[dtype]:
        col_err = (out2 - ref2).norm(dim=0) / ref2.norm(dim=0).clamp_min(1e-30)
        row_err = (out2 - ref2).norm(dim=1) / ref2.norm(dim=1).clamp_min(1e-30)
        wc = torch.topk(col_err, min(8, col_err.numel())).indices.tolist()
        wr = torch.topk(row_err, min(8, row_err.numel())).indices.tolist()
        frac_cols = (col_err > TOL[dtype]).float().mean().item()
        frac_rows = (row_err > TOL[dtype]).float().mean().item()
        pytest.fail(
            f"{ctx}: relative error {err:.3e} >= {TOL[dtype]:.1e}; bad columns {frac_cols:.1%} (worst {wc}, "
            f"col % 64 = {[c % 64 for c in wc]}), bad rows {frac_rows:.1%} (worst {wr})"
        )
    return err


# --------------------------------------------------------------------------- smoke / layout debugging


# (rows per call, tile): 64 rows run the tiled kernel with each tile, 8 rows the streaming kernel
IDENTITY_RUNS = [(64, tile) for tile in TILES] + [(8, None)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,tile", IDENTITY_RUNS, ids=[f"{r}rows-{t}" for r, t in IDENTITY_RUNS])
@pytest.mark.parametrize("sym", [True, False])
def test_identity_input_recovers_dequantized_weight_exactly(dtype, rows, tile, sym):
    """x = I, `rows` rows per call: out[i] is row i of the dequantized weight, exactly (a single product per
    output; the streaming kernel adds raw (magic + q) products and subtracts the zero per chunk, and must still
    land exactly on (q - z) * s rounded once).

    The first test to look at when anything fails: a mismatch pinpoints (k, n) and thus the lane / nibble."""
    K, N = 256, 256
    cfg = _cfg(sym=sym, gs=64)
    packed = get_packed(K, N, cfg, dtype)
    want = dequantize_like_kernel(packed).to(dtype)
    kw = {} if tile is None else {"thread_n": tile[0], "thread_k": tile[1]}
    for m0 in range(0, K, rows):
        x = torch.zeros(rows, K, dtype=dtype, device="cuda")
        x[torch.arange(rows), m0 + torch.arange(rows)] = 1
        out = run(x, packed, **kw)
        bad = (out != want[m0:m0 + rows]).nonzero()
        if bad.numel():
            k, n = (bad[:8, 0] + m0).tolist(), bad[:8, 1].tolist()
            info = [f"(k={a}, n={b}: lane {4 * (b % 8) + (a % 8) // 2}, word {(b % 64) // 16}, "
                    f"slot {4 * (a % 2) + 2 * ((b % 16) // 8) + (a % 16) // 8})" for a, b in zip(k, n)]
            pytest.fail(f"{bad.shape[0]} of {rows * N} weights wrong in rows {m0}..{m0 + rows - 1}, first: {info}; "
                        f"got {out[bad[0, 0], bad[0, 1]].item()} want {want[m0 + bad[0, 0], bad[0, 1]].item()}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_smallest_problem(dtype):
    layer, raw = get_layer(64, 8, _cfg(gs=-1))
    packed = get_packed(64, 8, _cfg(gs=-1), dtype)
    x = torch.randn(1, 64, dtype=dtype, device="cuda")
    check(run(x, packed), oracle(raw, x), dtype, "K=64 N=8 M=1")


# ------------------------------------------------------------------------------------------ variants


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vi", range(len(VARIANTS)), ids=[f"{f}-{'sym' if s else 'asym'}-{'act' if a else 'noact'}-g{g}" for f, s, a, g in VARIANTS])
def test_variants(vi, dtype):
    fmt, sym, desc_act, gs = VARIANTS[vi]
    cfg = _cfg(fmt, sym, desc_act, gs)
    K, N = [(576, 1536), (768, 1280), (352, 264)][vi % 3]
    layer, raw = get_layer(K, N, cfg, seed=vi)
    packed = get_packed(K, N, cfg, dtype, seed=vi)
    offset = vi * 3 + (dtype == BF16)
    for r in range(3):
        M = M_ALL[(offset + 7 * r) % len(M_ALL)]
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        check(run(x, packed), oracle(raw, x), dtype, f"{VARIANTS[vi]} K={K} N={N} M={M}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(576, 1536), (4096, 4096), (1536, 192), (256, 264), (128, 8), (4104, 1000)])
def test_shapes_all_m(K, N, dtype):
    cfg = _cfg("gptq", False, True, 128)
    layer, raw = get_layer(K, N, cfg, bias=True, seed=K + N)
    packed = get_packed(K, N, cfg, dtype, bias=True, seed=K + N)
    bias = raw["bias"].to(dtype)
    for M in M_ALL:
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        check(run(x, packed, bias), oracle(raw, x, bias), dtype, f"K={K} N={N} M={M}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(14336, 4096), (4096, 14336)])
def test_llm_shapes(K, N, dtype):
    cfg = _cfg("gptq", True, False, 128)
    layer, raw = get_layer(K, N, cfg)
    packed = get_packed(K, N, cfg, dtype)
    for M in (1, 16, 64, 128):
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        check(run(x, packed), oracle(raw, x), dtype, f"K={K} N={N} M={M}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("gs", [32, 128, -1])
def test_every_tile_and_m_block(tile, gs, dtype):
    """All 12 tiled kernels per dtype (3 tiles x m-blocks of 9-16, 17-32, 33-48, 49-64 rows) and, for 1 row and the
    last rows of 65 and 200, the streaming kernel; with and without forced cross-block reductions / k-splits."""
    K, N = 1024, 768
    cfg = _cfg("gptq_v2", False, gs != -1, gs)
    layer, raw = get_layer(K, N, cfg, seed=21)
    packed = get_packed(K, N, cfg, dtype, seed=21)
    for M in (1, 12, 17, 40, 64, 65, 200):
        for sms in (-1, 3, 16):
            x = torch.randn(M, K, dtype=dtype, device="cuda")
            out = run(x, packed, thread_n=tile[0], thread_k=tile[1], sms=sms)
            check(out, oracle(raw, x), dtype, f"tile={tile} gs={gs} M={M} sms={sms}")


@pytest.mark.parametrize("sms", [1, 2, 7, 13, 100])
def test_long_stripes_and_reductions(sms):
    K, N = 2048, 512
    cfg = _cfg("gptq", False, False, 64)
    layer, raw = get_layer(K, N, cfg, seed=31)
    packed = get_packed(K, N, cfg, F16, seed=31)
    for M in (1, 64, 200):
        x = torch.randn(M, K, dtype=F16, device="cuda")
        check(run(x, packed, sms=sms), oracle(raw, x), F16, f"sms={sms} M={M}")


def test_group_size_not_power_of_two():
    K, N = 336, 136  # group 48 is re-expressed as 16; K=336 is 7 groups of 48
    cfg = _cfg("gptq", False, True, 48)
    layer, raw = get_layer(K, N, cfg, seed=41)
    for dtype in DTYPES:
        packed = get_packed(K, N, cfg, dtype, seed=41)
        for M in (1, 33):
            x = torch.randn(M, K, dtype=dtype, device="cuda")
            check(run(x, packed), oracle(raw, x), dtype, f"g48 M={M}")


def test_leading_dims_noncontiguous_and_empty():
    K, N = 576, 1536
    cfg = _cfg()
    layer, raw = get_layer(K, N, cfg)
    packed = get_packed(K, N, cfg, F16)
    x = torch.randn(2, 3, K, dtype=F16, device="cuda")
    out = run(x, packed)
    assert out.shape == (2, 3, N)
    check(out, oracle(raw, x), F16, "3-D input")
    xt = torch.randn(K, 5, dtype=F16, device="cuda").t()  # non-contiguous
    check(run(xt, packed), oracle(raw, xt), F16, "transposed input")
    xo = torch.randn(4 * K + 1, dtype=F16, device="cuda")[1:].view(4, K)  # 2-byte offset: misaligned base
    check(run(xo, packed), oracle(raw, xo), F16, "misaligned input")
    assert run(torch.empty(0, K, dtype=F16, device="cuda"), packed).shape == (0, N)


# ------------------------------------------------------------------------- the streaming kernel (M <= 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gs", [16, 32, 64, 128, -1])  # chunks of 1, 2, 4, 8 and 8 k-blocks
@pytest.mark.parametrize("sym", [True, False])
def test_stream_kernel_chunks_splits_and_tails(gs, sym, dtype):
    """Every chunk size, forced k-splits (even, uneven, more splits than a warp has chunks), K = 1000 (a partial
    last chunk and a half k-block, 1000 % 16 = 8) and N = 200 (columns past N in the last 64-column tile)."""
    K, N = 1000, 200
    cfg = _cfg("gptq" if sym else "gptq_v2", sym, False, gs)
    layer, raw = get_layer(K, N, cfg, bias=True, seed=91)
    packed = get_packed(K, N, cfg, dtype, bias=True, seed=91)
    bias = raw["bias"].to(dtype)
    for M, splits in itertools.product((1, 3, 8), (-1, 1, 2, 3, 7, 64)):
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        check(run(x, packed, bias, sms=splits), oracle(raw, x, bias), dtype, f"g{gs} M={M} splits={splits}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gs", [16, 32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_stream_kernel_16_warp_grids(gs, sym, dtype):
    """The 16-warp grids (one CTA per column tile over all of K), which the kernel picks when a layer's column tiles
    number between half and all of the SMs: N sized from this GPU's SM count so that 64-column tiles (4 atoms per
    warp, groups >= 64), then 32-column tiles (2 atoms), then tiles of two and of four groups of warps side by side
    in N (128 and 256 columns, where the 64-column tiles outnumber the SMs) fall in that range, and last 48-column tiles
    (3 atoms, groups >= 64: 8 (sms // 8) of them, where 64-column tiles fill the SMs too but are fewer, as 4096x6144 on
    132 SMs); N - 40 leaves padded columns in the last tile, K = 2000 / 1000 a partial last chunk. K = 4608 gives the
    32-column tiles more than two chunks per warp, which only M = 1 runs on them (M = 3, 8: 8-warp CTAs, k-splits)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = 3 * sms // 4
    cfg = _cfg("gptq" if sym else "gptq_v2", sym, False, gs)
    for K, n in ((2000, 64 * tiles), (1000, 32 * tiles), (4608, 32 * tiles), (2000, 128 * tiles), (1000, 256 * tiles),
                 (2000, 384 * (sms // 8))):
        N = n - 40
        layer, raw = get_layer(K, N, cfg, bias=True, seed=93)
        packed = get_packed(K, N, cfg, dtype, bias=True, seed=93)
        bias = raw["bias"].to(dtype)
        for M in (1, 3, 8):
            x = torch.randn(M, K, dtype=dtype, device="cuda")
            check(run(x, packed, bias), oracle(raw, x, bias), dtype, f"K={K} N={N} g{gs} M={M}")


@pytest.mark.parametrize("M", [1, 5, 8])
def test_stream_kernel_reads_nothing_past_its_rows(M):
    """x is the head of a NaN-filled buffer: a read past row M - 1 or past column K - 1 of the last row (the
    lanes of rows >= M, the k-blocks past K) would turn outputs into NaN."""
    K, N = 1000, 512
    cfg = _cfg("gptq_v2", False, False, 64)  # no act-order: its column gather would copy x
    layer, raw = get_layer(K, N, cfg, seed=92)
    packed = get_packed(K, N, cfg, F16, seed=92)
    buf = torch.full((M * K + 64 * K,), float("nan"), dtype=F16, device="cuda")
    buf[: M * K] = torch.randn(M * K, dtype=F16, device="cuda")
    x = buf[: M * K].view(M, K)
    check(run(x, packed), oracle(raw, x), F16, f"M={M} NaN after the last row")


# ------------------------------------------------------------------------------------------- repack


@pytest.mark.parametrize("K,N,gs,desc_act", [(576, 1536, 128, False), (576, 1536, 128, True), (352, 264, 32, True), (4096, 4096, 128, True), (200, 192, -1, False)])
def test_gpu_repack_is_bit_identical_to_cpu_packer(K, N, gs, desc_act):
    cfg = _cfg("gptq", False, desc_act, gs)
    gpu_layer, _ = random_gptq_layer(K, N, cfg, seed=K, device="cuda")
    cpu_layer, _ = random_gptq_layer(K, N, cfg, seed=K, device="cpu")
    for dtype in DTYPES:
        g = pack_gptq_layer(gpu_layer, dtype)
        c = pack_gptq_layer_cpu(cpu_layer, dtype)
        assert g.qweight.is_cuda
        assert set(g.tensors()) == set(c.tensors())
        for name, t in c.tensors().items():
            assert torch.equal(g.tensors()[name].cpu(), t), name


# ----------------------------------------------------------------------- determinism, graphs, compile


def test_deterministic():
    K, N = 4096, 1024
    cfg = _cfg("gptq", False, False, 128)
    layer, raw = get_layer(K, N, cfg, seed=51)
    for dtype in DTYPES:
        packed = get_packed(K, N, cfg, dtype, seed=51)
        for M, sms in ((1, -1), (1, 5), (64, 7), (300, -1)):
            x = torch.randn(M, K, dtype=dtype, device="cuda")
            a, b = run(x, packed, sms=sms), run(x, packed, sms=sms)
            assert torch.equal(a, b), f"M={M} sms={sms} {dtype}"


COUNTER_INTS = 1 << 16  # kCounterInts in kernels.h


@pytest.mark.parametrize("partial_slots", [2 * 9, 1])
def test_explicit_workspace_counters_are_left_zero(partial_slots):
    """An explicit workspace: counters first (must be zero), then fp32 partial tiles (64 x 256 floats per slot).
    With room for fewer than two slots the kernel falls back to one block (no split columns)."""
    K, N = 2048, 512
    cfg = _cfg()
    layer, raw = get_layer(K, N, cfg)
    packed = get_packed(K, N, cfg, F16)
    ws = torch.zeros(COUNTER_INTS + partial_slots * 64 * 256, dtype=torch.int32, device="cuda")
    x = torch.randn(100, K, dtype=F16, device="cuda")
    out = torch.ops.hf_int4.int4_gemm(x, packed.qweight, packed.scales, None, ws, N, K, packed.group_size, None, -1, -1, 9)
    check(out, oracle(raw, x), F16, "explicit workspace")
    assert int(ws[:COUNTER_INTS].abs().sum()) == 0
    with pytest.raises(RuntimeError, match="workspace has"):
        torch.ops.hf_int4.int4_gemm(x, packed.qweight, packed.scales, None, ws[:1000], N, K, packed.group_size, None)


def test_ops_take_any_leading_dimensions():
    """The op flattens [..., K] itself and returns [..., N] (the wrappers do not reshape): a 3-D input, also a
    non-contiguous one, gives the rows of the 2-D call, bit for bit."""
    K, N = 1024, 768
    cfg = _cfg(gs=128)
    _, raw = get_layer(K, N, cfg)
    packed = get_packed(K, N, cfg, F16)
    op = torch.ops.hf_int4.int4_gemm
    for M in (1, 16, 96):
        x = torch.randn(M, 2, K, dtype=F16, device="cuda").transpose(0, 1)  # [2, M, K], not contiguous
        flat = op(x.reshape(-1, K), packed.qweight, packed.scales, None, None, N, K, 128, None)
        out = op(x, packed.qweight, packed.scales, None, None, N, K, 128, None)
        assert out.shape == (2, M, N)
        assert torch.equal(out.reshape(-1, N), flat)
        check(out, oracle(raw, x), F16, f"M={M} 3-D")
    empty = op(torch.empty(0, 3, K, dtype=F16, device="cuda"), packed.qweight, packed.scales, None, None, N, K, 128, None)
    assert empty.shape == (0, 3, N)


@pytest.mark.parametrize("K", [2048, 4096])  # 4096: the streaming kernel's 16-warp grid on a 132-SM GPU
@pytest.mark.parametrize("graph", [False, True])
def test_chained_layers_wait_for_their_input(graph, K):
    """Each call may launch before the previous one ends (programmatic dependent launch): it must still read
    the previous call's finished output as its activations, and share the workspace safely. A chain of
    adjacent calls (no other kernel in between) where every output feeds the next; eager outputs land in
    NaN-poisoned buffers, graph replays see the previous replay's values in theirs."""
    raws, packed = chain_layers(K, 6, _cfg("gptq", True, False, 128), seed=80)
    for M, sms in ((1, -1), (16, 7), (64, -1)):
        calls = [lambda h, p=p, sms=sms: ops.int4_gemm(h, p, sms=sms) for p in packed]
        check_chained_calls(torch.randn(M, K, dtype=F16, device="cuda"), calls, raws, graph, f"M={M} sms={sms}")


def chain_layers(K, n_layers, cfg, seed):
    """(raws, fp16 packed) of n_layers square layers for a chain, every other column's scales negated and all
    scaled so that a layer keeps its input's norm. The integers average 7.5 against a zero point of 8, so each
    layer's weights share a mean that a chain compounds by ~sqrt(K)/8 per layer (fp16 overflowed at the 10th
    layer of K=1024); alternating signs cancel it. What is left, rms(W) sqrt(K) ~ 1.2 per layer, overflowed at
    the 50th."""
    raws, packed = [], []
    sign = torch.tensor([1.0, -1.0], device="cuda").repeat(K // 2).half()
    for i in range(n_layers):
        _, raw = random_gptq_layer(K, K, cfg, seed=seed + i, device="cuda")
        gain = weight_from_ints(raw).pow(2).mean().sqrt() * K**0.5
        raw = dict(raw, scales=(raw["scales"] * sign / gain).half())
        layer = make_gptq_layer("chain", raw["intweight"], raw["zeros"], raw["scales"], raw["g_idx"], cfg)
        raws.append(raw)
        packed.append(pack_gptq_layer(layer, F16))
    return raws, packed


def check_chained_calls(x, calls, raws, graph, where):
    """calls[i] (one layer each, square) applied in a chain, each output the next call's input, checked layer by
    layer against the oracle of raws[i] on the input it got. Eager: outputs land in NaN-poisoned buffers; graph:
    captured once, replayed twice on fresh inputs, each replay's buffers holding the previous replay's values."""

    def chain():
        outs, h = [], x
        for call in calls:
            h = call(h)
            outs.append(h)
        return outs

    def check_chain(outs):
        torch.cuda.synchronize()
        for i, (raw, inp, out) in enumerate(zip(raws, [x] + outs[:-1], outs)):
            check(out, oracle(raw, inp), F16, f"{where} graph={graph} layer {i}")

    chain()  # warm up: workspaces, kernel attributes
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = chain()
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            g.replay()
            check_chain(outs)
    else:
        poison_allocator(x.numel() * x.element_size(), copies=len(calls) + 2)  # the outputs' size (square layers)
        check_chain(chain())


@pytest.mark.parametrize("fresh_stream", [False, True])
def test_cuda_graph(fresh_stream):
    K, N = 1536, 576
    cfg = _cfg("gptq_v2", False, True, 64)
    layer, raw = get_layer(K, N, cfg, bias=True, seed=61)
    packed = get_packed(K, N, cfg, BF16, bias=True, seed=61)
    bias = raw["bias"].to(BF16)
    static_x = torch.randn(5, K, dtype=BF16, device="cuda")
    stream = torch.cuda.Stream()
    if not fresh_stream:  # the usual recipe: warm up on the capture stream first
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            ops.int4_gemm(static_x, packed, bias, sms=11)
        torch.cuda.current_stream().wait_stream(stream)
    # fresh_stream: the first call on `stream` happens during capture (workspace created in the graph)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        static_out = ops.int4_gemm(static_x, packed, bias, sms=11)
        static_out2 = ops.int4_gemm(static_x * 2, packed, bias, sms=11)
    for _ in range(3):
        new_x = torch.randn(5, K, dtype=BF16, device="cuda")
        static_x.copy_(new_x)
        g.replay()
        torch.cuda.synchronize()
        check(static_out, oracle(raw, new_x, bias), BF16, "graph replay")
        check(static_out2, oracle(raw, new_x * 2, bias), BF16, "graph replay 2")
        assert torch.equal(static_out, ops.int4_gemm(new_x, packed, bias, sms=11))
    with torch.cuda.stream(stream):  # eager use of the capture stream afterwards
        out = ops.int4_gemm(new_x, packed, bias, sms=11)
    torch.cuda.current_stream().wait_stream(stream)
    check(out, oracle(raw, new_x, bias), BF16, "eager on the capture stream")


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile_fullgraph(mode):
    K, N = 576, 1536
    cfg = _cfg("gptq", False, True, 128)
    layer, raw = get_layer(K, N, cfg, bias=True, seed=71)
    packed = get_packed(K, N, cfg, F16, bias=True, seed=71)
    bias = raw["bias"].to(F16)

    def f(x):
        return torch.nn.functional.silu(ops.int4_gemm(x, packed, bias)) * 2

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, mode=mode)
    for M in (1, 3, 1, 17):
        x = torch.randn(M, K, dtype=F16, device="cuda")
        for _ in range(3):  # reduce-overhead records a graph on a later call
            got = cf(x)
        torch.testing.assert_close(got, f(x), rtol=1e-3, atol=1e-3)


def test_fake_impl_opcheck():
    K, N = 576, 1536
    cfg = _cfg("gptq", False, False, 128)
    packed = get_packed(K, N, cfg, F16)
    x = torch.randn(3, K, dtype=F16, device="cuda")
    args = (x, packed.qweight, packed.scales, packed.zeros, None, N, K, packed.group_size, None)
    torch.library.opcheck(torch.ops.hf_int4.int4_gemm.default, args, test_utils=("test_schema", "test_faketensor"))
    h = torch.randn(3, 2 * K, dtype=F16, device="cuda")
    torch.library.opcheck(torch.ops.hf_int4.int4_gemm.default, (h,) + args[1:], {"up_offset": K},
                          test_utils=("test_schema", "test_faketensor"))
    layer, _ = get_layer(K, N, cfg)
    torch.library.opcheck(torch.ops.hf_int4.repack_gptq.default, (layer.qweight, None, K, N), test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------ gated input


def silu_mul_reference(h, size_k, up_offset, dtype):
    """float64 silu(gate) * up of h's values, and what the kernel's arithmetic may be off by per value: a few roundings
    to dtype of the result (fp16 math for fp16, fp32 then one rounding for bf16), tanh.approx's error (~2^-11,
    absolute on tanh in [-1, 1]) times |gate / 2 * up|, and fp16's absolute rounding where a product falls among its
    subnormals (below 2^-14, spaced 2^-24 apart): gate / 2 * (1 + tanh) there is off by up to 2^-25, which the
    multiply by up carries, and the result's own rounding adds as much again."""
    gate, up = h[..., :size_k].double(), h[..., up_offset:up_offset + size_k].double()
    ref = gate * torch.sigmoid(gate) * up
    unit, subnormal = (2.0**-11, 2.0**-24) if dtype == F16 else (2.0**-8, 2.0**-133)
    return ref, 4 * unit * ref.abs() + 2.0**-9 * (gate / 2 * up).abs() + subnormal * (up.abs() + 1) + 1e-30


def poisoned_gated(rows, size_k, up_offset, width, dtype, seed, row_stride=None, shift=0):
    """h [rows, width] (as a view of rows `row_stride` apart, starting `shift` values into its storage) with the gate at
    column 0 and the up projection at up_offset, every other column NaN: read, they would show."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    stride = row_stride or width
    store = torch.full((rows * stride + shift + width,), float("nan"), dtype=dtype, device="cuda")
    h = store.as_strided((rows, width), (stride, 1), shift)
    h[:, :size_k] = 3 * torch.randn(rows, size_k, generator=gen, device="cuda")
    h[:, up_offset:up_offset + size_k] = torch.randn(rows, size_k, generator=gen, device="cuda")
    return h


def gated_input(M, K, up_offset, width, dtype, seed):
    """A gated MLP's gate and up projections side by side in rows of `width` (poisoned_gated), and the input they stand
    for, silu(gate) * up, in float64 rounded once to dtype."""
    h = poisoned_gated(M, K, up_offset, width, dtype, seed)
    return h, silu_mul_reference(h, K, up_offset, dtype)[0].to(dtype)


# (K, N, up_offset, width): up right after the gate (Llama's 14336), after padding columns, with columns past it
GATED_SHAPES = [(14336, 4096, 14336, 28672), (576, 1536, 640, 1280), (352, 264, 384, 744), (4096, 4096, 4096, 8192)]


# (VARIANTS index, GATED_SHAPES index): sym / asym at every group size, act-order (formed by the wrapper)
GATED_CASES = [(2, 0), (10, 3), (1, 1), (8, 2), (3, 2), (11, 1), (6, 1), (28, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vi,si", GATED_CASES, ids=["{}-{}-{}-g{}-K{}".format(
    VARIANTS[vi][0], "sym" if VARIANTS[vi][1] else "asym", "act" if VARIANTS[vi][2] else "noact", VARIANTS[vi][3],
    GATED_SHAPES[si][0]) for vi, si in GATED_CASES])
def test_gated_input_matches_the_oracle(vi, si, dtype):
    """up_offset > 0: the op's input is silu(gate) * up, which the streaming kernel forms as it reads (M <= 8) and the
    wrapper forms first for more rows and for act-order; against the oracle of that input, every row count, k-split."""
    fmt, sym, desc_act, gs = VARIANTS[vi]
    cfg = _cfg(fmt, sym, desc_act, gs)
    K, N, up_offset, width = GATED_SHAPES[si]
    layer, raw = get_layer(K, N, cfg, bias=True, seed=100 + vi)
    packed = get_packed(K, N, cfg, dtype, bias=True, seed=100 + vi)
    bias = raw["bias"].to(dtype)
    for M in (1, 2, 3, 5, 8, 9, 17):
        for sms in ((-1, 3) if M <= 8 else (-1,)):
            h, x = gated_input(M, K, up_offset, width, dtype, seed=M)
            out = run(h, packed, bias, up_offset=up_offset, sms=sms)
            check(out, oracle(raw, x, bias), dtype, f"{VARIANTS[vi]} K={K} N={N} up_offset={up_offset} M={M} sms={sms}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_input_takes_leading_dimensions_and_cuda_graphs(dtype):
    K, N, up_offset, width = GATED_SHAPES[1]
    cfg = _cfg("gptq", True, False, 64)
    layer, raw = get_layer(K, N, cfg, seed=7)
    packed = get_packed(K, N, cfg, dtype, seed=7)
    h, x = gated_input(6, K, up_offset, width, dtype, seed=8)
    out = run(h.view(2, 3, width), packed, up_offset=up_offset)
    check(out, oracle(raw, x).view(2, 3, N), dtype, "gated [2, 3, width]")
    static_h = h.clone()
    ops.int4_gemm(static_h, packed, up_offset=up_offset)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.int4_gemm(static_h, packed, up_offset=up_offset)
    h2, x2 = gated_input(6, K, up_offset, width, dtype, seed=9)
    static_h.copy_(h2)
    graph.replay()
    check(static_out, oracle(raw, x2), dtype, "gated, CUDA graph replay")


# (rows, size_k, up_offset, width, row_stride, shift): 16-byte vectors (Llama-3-8B's MLP, the fused gate/up of a padded
# 352-wide MLP, a row stride past the width), values one by one (odd size_k, up_offset or row stride, or rows that start
# off a 16-byte boundary), no rows
SILU_MUL_CASES = [(3, 14336, 14336, 28672, None, 0), (17, 352, 384, 744, None, 0), (1000, 328, 384, 712, 736, 0),
                  (5, 7, 9, 17, None, 0), (33, 100, 104, 210, None, 0), (9, 352, 384, 744, 745, 0),
                  (9, 352, 384, 744, None, 1), (64, 352, 384, 744, 752, 8), (0, 352, 384, 744, None, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,size_k,up_offset,width,row_stride,shift", SILU_MUL_CASES)
def test_silu_mul_matches_float64(rows, size_k, up_offset, width, row_stride, shift, dtype):
    """The gated input for more rows than the streaming kernel takes (hf_int4.ops.silu_mul), against float64."""
    h = poisoned_gated(rows, size_k, up_offset, width, dtype, seed=rows + size_k, row_stride=row_stride, shift=shift)
    out = ops.silu_mul(h, size_k, up_offset)
    assert out.shape == (rows, size_k) and out.dtype == dtype and out.is_contiguous()
    ref, bound = silu_mul_reference(h, size_k, up_offset, dtype)
    err = (out.double() - ref).abs()
    assert bool(torch.isfinite(out).all()), "a NaN column outside the gate and up slices was read"
    bad = (err > bound).nonzero()[:4].tolist()
    assert not bad, "beyond the bound at (row, column): gate, up, ours, float64: " + "; ".join(
        f"{(r, c)}: {h[r, c].item():.4g}, {h[r, up_offset + c].item():.4g}, {out[r, c].item():.4g}, {ref[r, c].item():.4g}"
        for r, c in bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_forms_what_the_streaming_kernel_forms(dtype):
    """Same bits at every M: the streaming kernel's gated input (up to 8 rows) and silu_mul followed by the GEMM give the
    same output; leading dimensions, torch.compile and a CUDA graph give silu_mul's own bits."""
    K, N, up_offset, width = GATED_SHAPES[1]
    packed = get_packed(K, N, _cfg("gptq", True, False, 64), dtype, seed=7)
    h = poisoned_gated(8, K, up_offset, width, dtype, seed=3)
    for m in (1, 8):
        assert torch.equal(ops.int4_gemm(h[:m], packed, up_offset=up_offset),
                           ops.int4_gemm(ops.silu_mul(h[:m], K, up_offset), packed)), f"M = {m}"
    want = ops.silu_mul(h, K, up_offset)
    assert torch.equal(ops.silu_mul(h.reshape(2, 4, width), K, up_offset), want.view(2, 4, K))
    assert torch.equal(torch.compile(ops.silu_mul, fullgraph=True)(h, K, up_offset), want)
    static_h = h.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ops.silu_mul(static_h, K, up_offset)
    h2 = poisoned_gated(8, K, up_offset, width, dtype, seed=4)
    static_h.copy_(h2)
    graph.replay()
    assert torch.equal(static_out, ops.silu_mul(h2, K, up_offset))
    torch.library.opcheck(torch.ops.hf_int4.silu_mul.default, (h, K, up_offset))


# -------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    K, N = 576, 1536
    cfg = _cfg()
    packed = get_packed(K, N, cfg, F16)
    x = torch.randn(2, K, dtype=F16, device="cuda")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        ops.int4_gemm(x.float(), packed)
    with pytest.raises(ValueError, match="packed for torch.float16"):
        ops.int4_gemm(x.bfloat16(), packed)
    with pytest.raises(ValueError, match=r"\[\.\.\., 576\]"):
        ops.int4_gemm(torch.randn(2, 512, dtype=F16, device="cuda"), packed)
    with pytest.raises(ValueError, match="CUDA tensor"):
        ops.int4_gemm(x.cpu(), packed)
    with pytest.raises(ValueError, match="packed weight is on cpu"):
        ops.int4_gemm(x, packed.to("cpu"))
    with pytest.raises(ValueError, match="bias"):
        ops.int4_gemm(x, packed, torch.zeros(N + 8, dtype=F16, device="cuda"))
    op = torch.ops.hf_int4.int4_gemm
    with pytest.raises(RuntimeError, match=r"activation must be \[\.\.\., K\] with K=576"):
        op(torch.randn(2, 512, dtype=F16, device="cuda"), packed.qweight, packed.scales, None, None, N, K, 128, None)
    with pytest.raises(RuntimeError, match="scales have shape"):
        op(x, packed.qweight, packed.scales[:2], None, None, N, K, 128, None)
    with pytest.raises(RuntimeError, match="b_packed has shape"):
        op(x, packed.qweight[:4], packed.scales, None, None, N, K, 128, None)
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        op(x.cpu(), packed.qweight.cpu(), packed.scales.cpu(), None, None, N, K, 128, None)
    with pytest.raises(ValueError, match="up_offset >= 576"):
        ops.int4_gemm(torch.randn(2, 1152, dtype=F16, device="cuda"), packed, up_offset=512)
    with pytest.raises(ValueError, match="gated input"):
        ops.int4_gemm(torch.randn(2, 1100, dtype=F16, device="cuda"), packed, up_offset=576)
    gated = torch.randn(2, 1160, dtype=F16, device="cuda")
    with pytest.raises(RuntimeError, match="a multiple of 8"):
        op(gated, packed.qweight, packed.scales, None, None, N, K, 128, None, -1, -1, -1, 580)
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        op(torch.randn(9, 1152, dtype=F16, device="cuda"), packed.qweight, packed.scales, None, None, N, K, 128, None,
           -1, -1, -1, 576)
    with pytest.raises(RuntimeError, match="up_offset >= size_k"):
        torch.ops.hf_int4.silu_mul(torch.randn(2, 1100, dtype=F16, device="cuda"), 576, 576)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.hf_int4.silu_mul(torch.randn(2, 1152, device="cuda"), 576, 576)
    x32 = torch.randn(32, K, dtype=F16, device="cuda")  # tiles are the tiled kernel's: rows past 16
    with pytest.raises(RuntimeError, match="thread_n/thread_k tile is not available"):
        op(x32, packed.qweight, packed.scales, None, None, N, K, 128, None, 128, 128, -1)  # 576 % 128 != 0


# -------------------------------------------------------------------------------- diagnostics / bench


def _diagnose():
    """A compact table for humans: relative errors over variants, tiles and M."""
    print(f"device: {torch.cuda.get_device_name()}  sm_{''.join(map(str, torch.cuda.get_device_capability()))}")
    rows = []
    for dtype in DTYPES:
        for (fmt, sym, act, gs), (K, N) in itertools.product(VARIANTS[::3], [(576, 1536), (1024, 768)]):
            cfg = _cfg(fmt, sym, act, gs)
            layer, raw = get_layer(K, N, cfg)
            packed = get_packed(K, N, cfg, dtype)
            for tile in [None] + TILES:
                for M in (1, 16, 33, 64, 129):
                    kw = {} if tile is None else {"thread_n": tile[0], "thread_k": tile[1]}
                    x = torch.randn(M, K, dtype=dtype, device="cuda")
                    try:
                        out = ops.int4_gemm(x, packed, **kw)
                        ref = oracle(raw, x)
                        err = ((out.double() - ref).norm() / ref.norm()).item()
                        nan = int((~torch.isfinite(out)).sum())
                        status = "ok" if err < TOL[dtype] and nan == 0 else "FAIL"
                    except RuntimeError as e:
                        err, nan, status = float("nan"), -1, f"n/a ({str(e).splitlines()[0][:60]})"
                    rows.append((str(dtype)[6:], f"{fmt}/{'sym' if sym else 'asym'}/{'act' if act else '-'}/g{gs}", f"{K}x{N}", str(tile), M, err, nan, status))
    for r in rows:
        print(f"{r[0]:9s} {r[1]:26s} {r[2]:10s} tile={r[3]:11s} M={r[4]:4d} err={r[5]:.2e} nan={r[6]} {r[7]}")
    print(f"{sum(r[7] == 'FAIL' for r in rows)} failures of {len(rows)}")


def _bench(sweep=False):
    """GPU time per call vs fp16 cuBLAS, measured on CUDA-graph replays of 24 calls (no launch overhead) that
    rotate over weight copies larger than L2 (cold weights, as in decode)."""
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    calls = 24

    def timeit(fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(calls):
                fn(i)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for i in range(calls):
                fn(i)
        times = []
        for _ in range(15):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / calls)
        return sorted(times)[len(times) // 2]  # us per call

    print(f"device: {torch.cuda.get_device_name()}")
    for K, N in [(8192, 8192), (4096, 14336), (14336, 4096), (4096, 4096)]:
        cfg = _cfg("gptq", True, False, 128)
        layer, raw = random_gptq_layer(K, N, cfg, seed=0, device="cuda")
        p0 = pack_gptq_layer(layer, F16)
        copies = max(2, math.ceil(3 * l2 / (K * N // 2)))
        packs = [p0] + [PackedInt4Weight(p0.qweight.clone(), p0.scales.clone(), None, None, K, N, p0.group_size) for _ in range(copies - 1)]
        wcopies = max(2, math.ceil(3 * l2 / (K * N * 2)))
        ws = [torch.randn(K, N, dtype=F16, device="cuda") for _ in range(wcopies)]
        for M in (1, 2, 4, 8, 16, 32, 64, 128):
            x = torch.randn(M, K, dtype=F16, device="cuda")
            t_cublas = timeit(lambda i: torch.matmul(x, ws[i % wcopies]))
            t_int4 = timeit(lambda i: ops.int4_gemm(x, packs[i % copies]))
            best = ""
            if sweep:
                res = []
                for (tn, tk), sms in itertools.product(TILES, (-1, 66, 264)):
                    try:
                        t = timeit(lambda i: ops.int4_gemm(x, packs[i % copies], thread_n=tn, thread_k=tk, sms=sms))
                        res.append((t, tn, tk, sms))
                    except RuntimeError:
                        pass
                t, tn, tk, sms = min(res)
                best = f"  best {t:7.1f} us: tile {tn}x{tk} sms={sms} ({t_cublas / t:.2f}x)"
            gbs = (K * N / 2 + M * K * 2 + M * N * 2) / (t_int4 * 1e-6) / 1e9
            print(f"{K:6d}x{N:<6d} M={M:4d}  cublas {t_cublas:7.1f} us  int4 {t_int4:7.1f} us  "
                  f"speedup {t_cublas / t_int4:5.2f}x  ({gbs:6.0f} GB/s){best}", flush=True)


if __name__ == "__main__":
    if "--bench" in sys.argv:
        _bench(sweep="--sweep" in sys.argv)
    else:
        _diagnose()
