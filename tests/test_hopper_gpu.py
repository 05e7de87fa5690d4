"""GPU tests of the Hopper kernel (torch.ops.hf_int4.hopper_int4_gemm, CUTLASS TMA + wgmma).

Oracle as in test_decode_kernel: float64 math on the unpacked GPTQ integers of the fixture writer.
"""
import glob
import itertools
import shutil
import subprocess

import pytest
import torch

from hf_int4._extension import hopper_available

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or not hopper_available(),
    reason="needs an sm_90 GPU and the built hf_int4._hopper extension",
)

from gptq_oracle import oracle  # noqa: E402
from test_decode_kernel import (  # noqa: E402
    DTYPES, F16, _cfg, chain_layers, check, check_chained_calls, get_layer, get_packed, poison_allocator)

from hf_int4 import dispatch, ops  # noqa: E402
from hf_int4.packing import PackedInt4Weight  # noqa: E402

M_ALL = [64, 65, 128, 129, 255, 512, 1000, 4096]
HOPPER_PATHS = [p for p in dispatch.PATHS.values() if isinstance(p, dispatch.HopperPath)]


def configs(packed):
    """(schedule, splits) of every Hopper configuration dispatch can pick for this layer."""
    spec = dispatch.LinearSpec.of(packed)
    return [(p.schedule, p.splits) for p in HOPPER_PATHS if p.unsupported(spec) is None]


# fmt, sym, desc_act, gs: asymmetric layers run the schedules built with zero points (dispatch.ZERO_POINT_SCHEDULES)
VARIANTS = list(itertools.product(["gptq", "gptq_v2"], [True, False], [False, True], [64, 128, -1]))
VARIANT_IDS = [f"{f}-{'sym' if s else 'asym'}-{'act' if a else 'noact'}-g{g}" for f, s, a, g in VARIANTS]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,sym,desc_act,gs", VARIANTS, ids=VARIANT_IDS)
def test_hopper_matches_the_oracle_small_shape_every_m(dtype, fmt, sym, desc_act, gs):
    K, N = 576, 1536  # SmolLM2's MLP
    cfg = _cfg(fmt, sym, desc_act, gs)
    layer, raw = get_layer(K, N, cfg, bias=True)
    packed = get_packed(K, N, cfg, dtype, bias=True)
    bias = layer.bias.to(dtype)
    for M, (schedule, splits) in itertools.product(M_ALL, configs(packed)):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        where = f"M={M} schedule {schedule} splits {splits}"
        poison_allocator(M * N * 2)
        check(ops.hopper_linear(x, packed, bias, schedule, splits), oracle(raw, x, bias), dtype, where)
        poison_allocator(M * N * 2)
        check(ops.hopper_linear(x, packed, None, schedule, splits), oracle(raw, x), dtype, where + " no bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,sym,desc_act,gs", [v for v in VARIANTS if v[3] != -1],
                         ids=[i for v, i in zip(VARIANTS, VARIANT_IDS) if v[3] != -1])
def test_hopper_split_k_partials_every_variant(dtype, fmt, sym, desc_act, gs):
    """The partial-sum schedules (K-slices as a batch into fp32 partials, then a sum; asymmetric layers: those built
    with zero points) on a K that every split cuts into whole groups."""
    K, N = 1024, 384
    cfg = _cfg(fmt, sym, desc_act, gs)
    layer, raw = get_layer(K, N, cfg, bias=True)
    packed = get_packed(K, N, cfg, dtype, bias=True)
    bias = layer.bias.to(dtype)
    runs = [(p.schedule, p.splits) for p in HOPPER_PATHS if p.schedule in dispatch.PARTIAL_SUM_SCHEDULES
            and (sym or p.schedule in dispatch.ZERO_POINT_SCHEDULES)]
    assert runs and all(c in configs(packed) for c in runs)
    for M, (schedule, splits) in itertools.product([48, 64, 65, 129, 1000], runs):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        poison_allocator(M * N * 4 * splits)
        out = ops.hopper_linear(x, packed, bias, schedule, splits)
        check(out, oracle(raw, x, bias), dtype, f"M={M} schedule {schedule} splits {splits}")
        assert torch.equal(ops.hopper_linear(x, packed, bias, schedule, splits), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,gs,splits", [(576, 64, 3), (1152, 64, 2), (768, 128, 2), (768, 128, 3), (640, 64, 5),
                                         (1536, 128, 2)])
@pytest.mark.parametrize("sym", [True, False])
def test_hopper_partials_every_k_range_and_group_count(dtype, K, gs, splits, sym):
    """K-slices of an odd and an even number of k-tiles (3, 9, 6, 4, 2, 12: the consumer loop issues k-tiles in
    pairs, then maybe one more, tile_batched_mainloop.cuh), of one group per k-tile (64) or two, with odd and even
    group counts, on every partial-sum schedule (asymmetric: those built with zero points, whose zeros are sliced
    with the scales)."""
    N = 512
    cfg = _cfg(sym=sym, gs=gs)
    _, raw = get_layer(K, N, cfg)
    packed = get_packed(K, N, cfg, dtype)
    schedules = [s for s in sorted(dispatch.PARTIAL_SUM_SCHEDULES) if sym or s in dispatch.ZERO_POINT_SCHEDULES]
    for schedule, M in itertools.product(schedules, (1, 16, 33, 100)):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        poison_allocator(M * N * 4 * splits)
        check(ops.hopper_linear(x, packed, None, schedule, splits), oracle(raw, x), dtype,
              f"K={K} gs={gs} M={M} schedule {schedule} splits {splits}")


# 1024x384: three 128-row weight tiles, so a cluster of two (hopper_wide_cluster) has a CTA past the last tile
@pytest.mark.parametrize("K,N,sym", [(4096, 6144, True), (4096, 14336, True), (14336, 4096, True), (8192, 8192, True),
                                     (1024, 384, True), (14336, 4096, False), (4096, 6144, False)])
def test_hopper_matches_the_oracle_llama_shapes(K, N, sym):
    cfg = _cfg("gptq" if sym else "gptq_v2", sym, gs=128)
    _, raw = get_layer(K, N, cfg)
    for dtype in DTYPES:
        packed = get_packed(K, N, cfg, dtype)
        for M, (schedule, splits) in itertools.product((64, 129, 1000), configs(packed)):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            poison_allocator(M * N * 2)
            out = ops.hopper_linear(x, packed, None, schedule, splits)
            check(out, oracle(raw, x), dtype, f"{K}x{N} M={M} {dtype} schedule {schedule} splits {splits}")
            if splits > 1:  # partial tiles are summed in K order: the same bits every time
                assert torch.equal(ops.hopper_linear(x, packed, None, schedule, splits), out)


ZERO_POINT_PATHS = [p for p in HOPPER_PATHS if p.schedule in dispatch.ZERO_POINT_SCHEDULES]


@pytest.mark.parametrize("schedule,splits,sym",  # groups of 64
                         [(p.schedule, p.splits, True) for p in HOPPER_PATHS] +
                         [(p.schedule, p.splits, False) for p in ZERO_POINT_PATHS])
def test_hopper_in_a_cuda_graph_and_under_compile(schedule, splits, sym):
    K, N = 1024, 1536  # K cuts into 4 slices of whole tiles and groups
    cfg = _cfg(sym=sym, gs=64)
    _, raw = get_layer(K, N, cfg)
    packed = get_packed(K, N, cfg, F16)
    x = torch.randn(300, K, device="cuda", dtype=F16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.hopper_linear(x, packed, None, schedule, splits)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.hopper_linear(x, packed, None, schedule, splits)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out, oracle(raw, x), F16, "graph replay")
    torch._dynamo.reset()  # each configuration compiles this lambda anew; keep them under dynamo's recompile limit
    compiled = torch.compile(lambda t: ops.hopper_linear(t, packed, None, schedule, splits), fullgraph=True)
    check(compiled(x), oracle(raw, x), F16, "compiled")
    torch.library.opcheck(torch.ops.hf_int4.hopper_int4_gemm,
                          (x, packed.qweight, packed.scales, packed.zeros, None, N, K, packed.group_size, schedule,
                           splits))


@pytest.mark.parametrize("graph", [False, True])
def test_chained_layers_across_paths_wait_for_their_input(graph):
    """Kernels launch early behind the one before them (early_launch.h): the Hopper GEMMs, the split-K sum and
    the decode kernel. A chain where every output feeds the next layer, cycling through every Hopper
    configuration and the decode kernel (so each kind follows each other kind), must still read each input
    finished; eager outputs land in NaN-poisoned buffers, graph replays see the previous replay's values."""
    K = 1024  # square, and cut by every split into whole tiles and groups
    cfg = _cfg(gs=128)
    paths = HOPPER_PATHS + [dispatch.PATHS["decode"]]
    order = paths + paths[::-1]
    raws, packed = chain_layers(K, len(order), cfg, seed=90)
    for M in (16, 64, 129):
        calls = [lambda h, path=path, p=p: path.run(h, p, None) for path, p in zip(order, packed)]
        check_chained_calls(torch.randn(M, K, dtype=F16, device="cuda"), calls, raws, graph,
                            f"M={M} paths {[p.name for p in order]}")


@pytest.mark.parametrize("sym", [True, False])
def test_weights_rewritten_by_the_kernel_before_are_read_rewritten(sym):
    """Launched early, the streaming decode kernel requests its first weights and scales before it waits for the kernel
    before it (stream_gemm.cuh), on the assumption that no kernel writes them; the Hopper paths, which wait first, are
    held to the same (a branch loaded their weights early, kernel notes step 40). A kernel that rewrites those tensors
    just before (a torch kernel, which never lets the next one start before it ends) must still be seen: a long kernel
    first keeps the host ahead of the GPU, so each GEMM is launched while its weights are still being rewritten."""
    K, N, M = 1024, 1536, 64
    cfg = _cfg(sym=sym, gs=128)
    layers = [get_layer(K, N, cfg, seed=s)[1] for s in (95, 96)]
    sources = [get_packed(K, N, cfg, F16, seed=s) for s in (95, 96)]
    target = PackedInt4Weight.from_tensors(
        {k: v.clone() for k, v in sources[0].tensors().items()}, in_features=K, out_features=N, group_size=128)
    spec = dispatch.LinearSpec.of(target)
    x = torch.randn(M, K, device="cuda", dtype=F16)
    # (path, rows): the decode path on 5 rows runs the streaming kernel, on 64 the tiled one
    calls = [(p, x) for p in HOPPER_PATHS if p.unsupported(spec) is None] + [(dispatch.PATHS["decode"], x[:5]),
                                                                             (dispatch.PATHS["decode"], x)]
    outs = []
    for i, (path, rows) in enumerate(calls * 2):
        which = (i + 1) % 2  # the layer written now: never the one the previous call read
        torch.cuda._sleep(2_000_000)  # ~1 ms
        for name, t in target.tensors().items():  # elementwise kernels, not copies: a copy engine is no kernel
            torch.add(sources[which].tensors()[name], 0, out=t)
        outs.append((f"{path.name} M={rows.shape[0]}", which, rows, path.run(rows, target, None)))
    for where, which, rows, out in outs:
        check(out, oracle(layers[which], rows), F16, f"{where} after its weights were rewritten to layer {which}")


def test_hopper_takes_any_leading_dimensions():
    """The op flattens [..., K] itself and returns [..., N]: a non-contiguous 3-D input gives the 2-D call's rows."""
    K, N = 1024, 768
    cfg = _cfg(gs=128)
    _, raw = get_layer(K, N, cfg)
    packed = get_packed(K, N, cfg, F16)
    op = torch.ops.hf_int4.hopper_int4_gemm
    x = torch.randn(100, 2, K, dtype=F16, device="cuda").transpose(0, 1)  # [2, 100, K], not contiguous
    for schedule, splits in configs(packed):
        out = op(x, packed.qweight, packed.scales, None, None, N, K, 128, schedule, splits)
        assert out.shape == (2, 100, N)
        assert torch.equal(out.reshape(-1, N), op(x.reshape(-1, K), packed.qweight, packed.scales, None, None, N, K,
                                                  128, schedule, splits))
        check(out, oracle(raw, x), F16, f"3-D schedule {schedule} splits {splits}")


def test_hopper_refuses_what_it_cannot_run():
    asym = get_packed(576, 1536, _cfg(sym=False, gs=128), F16)
    x = torch.randn(64, 576, device="cuda", dtype=F16)
    no_zeros = next(p for p in HOPPER_PATHS if p.schedule not in dispatch.ZERO_POINT_SCHEDULES)
    with pytest.raises(RuntimeError, match=f"schedule {no_zeros.schedule} has no build with zero points"):
        ops.hopper_linear(x, asym, None, no_zeros.schedule, no_zeros.splits)
    odd = get_packed(200, 264, _cfg(gs=32), F16)
    with pytest.raises(RuntimeError, match="out_features % 128"):
        ops.hopper_linear(torch.randn(64, 200, device="cuda", dtype=F16), odd)
    sym = get_packed(576, 1536, _cfg(gs=128), F16)
    with pytest.raises(RuntimeError, match="splits apply to the split-K partial-sum schedules only"):
        ops.hopper_linear(x, sym, None, 0, 2)  # the data-parallel kernel cannot split K
    with pytest.raises(RuntimeError, match="slices of whole 64-row tiles"):
        ops.hopper_linear(x, sym, None, dispatch.PATHS["hopper_partials2"].schedule, 2)  # K = 576: 288-row slices
    with pytest.raises(RuntimeError, match="schedule must be"):  # one past the last configuration dispatch knows
        ops.hopper_linear(x, sym, None, max(p.schedule for p in HOPPER_PATHS) + 1)
    spec = dispatch.LinearSpec.of
    assert "slices" in dispatch.PATHS["hopper_partials2"].unsupported(spec(sym))
    assert "asymmetric" in no_zeros.unsupported(spec(asym))
    assert dispatch.PATHS["hopper"].unsupported(spec(asym)) is None
    assert "% 128" in dispatch.PATHS["hopper"].unsupported(spec(odd))
    g32 = get_packed(576, 1536, _cfg(gs=32), F16)
    assert "group size 32" in dispatch.PATHS["hopper"].unsupported(spec(g32))
    per_channel = get_packed(1024, 384, _cfg(gs=-1), F16)
    assert "per-channel" in dispatch.PATHS["hopper_partials2"].unsupported(spec(per_channel))


@pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="needs cuobjdump")
def test_hopper_sass_uses_hgmma():
    import hf_int4

    so = glob.glob(f"{hf_int4.__path__[0]}/_hopper*.so")[0]
    sass = subprocess.run(["cuobjdump", "-sass", so], capture_output=True, text=True, check=True).stdout
    assert "HGMMA" in sass
