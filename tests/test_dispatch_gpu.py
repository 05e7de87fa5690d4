"""GPU tests of the dequantize-then-cuBLAS path and of the dispatch between paths.

Oracle as in test_decode_kernel: float64 math on the unpacked GPTQ integers of the fixture writer.
"""
import json

import pytest
import torch

from hf_int4._extension import extension_available

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not extension_available(),
    reason="needs a CUDA GPU and the built hf_int4._C extension",
)

from gptq_oracle import oracle, weight_from_ints  # noqa: E402
from test_decode_kernel import DTYPES, F16, VARIANTS, _cfg, check, get_layer, get_packed, poison_allocator  # noqa: E402

from hf_int4 import HfInt4Linear, dispatch, ops  # noqa: E402
from hf_int4.modules import packed_state_dict  # noqa: E402

SHAPES = [(576, 1536), (136, 200), (1024, 8)]  # K not a multiple of 128 / of 64, N far below one tile


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,sym,desc_act,gs", VARIANTS)
def test_dequantize_gives_the_gptq_weight_transposed_in_packed_row_order(dtype, fmt, sym, desc_act, gs):
    for K, N in SHAPES:
        cfg = _cfg(fmt, sym, desc_act, gs)
        _, raw = get_layer(K, N, cfg)
        packed = get_packed(K, N, cfg, dtype)
        poison_allocator(N * K * 2)
        w = ops.dequantize(packed)
        assert w.shape == (N, K) and w.dtype == dtype
        perm = packed.perm.long() if packed.perm is not None else torch.arange(K, device="cuda")
        want = weight_from_ints(raw)[perm].T
        if dtype == F16:
            # (q - z) * s with fp16 scales is one rounding of an exact product: bit-exact
            assert torch.equal(w, want.to(F16)), f"{K}x{N} {fmt} sym={sym} act={desc_act} g{gs}"
        else:
            # packing rounds the fp16 scales to bf16 (2^-9 relative), the product rounds once more
            assert torch.isfinite(w).all()
            assert ((w.double() - want).abs() <= 2.0**-7 * want.abs()).all(), f"{K}x{N} bf16"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,sym,desc_act,gs", VARIANTS)
def test_dequant_linear_matches_the_oracle(dtype, fmt, sym, desc_act, gs):
    cfg = _cfg(fmt, sym, desc_act, gs)
    for K, N in SHAPES:
        layer, raw = get_layer(K, N, cfg, bias=True)
        packed = get_packed(K, N, cfg, dtype, bias=True)
        bias = layer.bias.to(dtype)
        for M in (1, 65, 300):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            poison_allocator(M * N * 2)
            check(ops.dequant_linear(x, packed, bias), oracle(raw, x, bias), dtype, f"{K}x{N} M={M}")


def test_dequant_linear_keeps_leading_dims_and_matches_the_decode_kernel():
    K, N = 576, 1536
    cfg = _cfg(sym=False, desc_act=True, gs=64)
    packed = get_packed(K, N, cfg, F16)
    x = torch.randn(2, 3, 70, K, device="cuda", dtype=F16)
    a, b = ops.dequant_linear(x, packed), ops.int4_gemm(x, packed)
    assert a.shape == (2, 3, 70, N)
    check(a, b.double(), F16, "dequant vs decode")


def test_dequant_temporary_is_one_layer_not_one_per_layer():
    """Layers of different sizes run back to back: the peak extra memory is the largest layer's fp16 weight
    plus the activations, because each temporary is freed (and its block reused) before the next layer."""
    sizes = [(1024, 4096), (4096, 2048), (2048, 2048), (2048, 1024)]
    layers = [get_packed(K, N, _cfg(), F16, seed=i) for i, (K, N) in enumerate(sizes)]
    x = torch.randn(256, 1024, device="cuda", dtype=F16)
    ops.dequant_linear(x, layers[0])  # cuBLAS workspace, allocator warm-up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    h = x
    for packed in layers:
        h = ops.dequant_linear(h, packed)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    largest = max(K * N * 2 for K, N in sizes)
    activations = sum(256 * N * 2 for _, N in sizes)
    assert extra <= largest + activations + 2**20, (extra, largest, activations)
    assert extra >= largest, "the temporary weight must show in the peak (else this test measures nothing)"


def test_dequant_linear_on_two_streams_and_in_a_cuda_graph():
    K, N = 576, 1536
    cfg = _cfg(sym=False, gs=32)
    _, raw = get_layer(K, N, cfg)
    packed = get_packed(K, N, cfg, F16)
    xs = [torch.randn(300, K, device="cuda", dtype=F16) for _ in range(2)]
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [None, None]
    for _ in range(3):  # the two streams interleave their temporaries
        for i, s in enumerate(streams):
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                outs[i] = ops.dequant_linear(xs[i], packed)
    torch.cuda.synchronize()
    for i in range(2):
        check(outs[i], oracle(raw, xs[i]), F16, f"stream {i}")
    x = torch.randn(300, K, device="cuda", dtype=F16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.dequant_linear(x, packed)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.dequant_linear(x, packed)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out, oracle(raw, x), F16, "graph replay")


def test_dequantize_op_checks_its_inputs():
    packed = get_packed(576, 1536, _cfg(), F16)
    with pytest.raises(RuntimeError, match="b_packed has shape"):
        torch.ops.hf_int4.dequantize_int4(packed.qweight[:-1], packed.scales, None, 1536, 576, 128)
    with pytest.raises(RuntimeError, match="scales have shape"):
        torch.ops.hf_int4.dequantize_int4(packed.qweight, packed.scales[:-1], None, 1536, 576, 128)
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        torch.ops.hf_int4.dequantize_int4(packed.qweight.cpu(), packed.scales.cpu(), None, 1536, 576, 128)
    torch.library.opcheck(torch.ops.hf_int4.dequantize_int4, (packed.qweight, packed.scales, None, 1536, 576, 128))


# ------------------------------------------------------------------------------------------ dispatch


@pytest.fixture
def table_crossing_after_64(tmp_path, monkeypatch):
    """A user table for this GPU: decode fastest up to M = 64, dequant at the next grid point (100) and on, so the
    plan takes dequant from M = 65."""
    monkeypatch.setenv("HF_INT4_CACHE", str(tmp_path))
    name = torch.cuda.get_device_name()
    table = {"version": 1, "device": name, "entries": [
        {"k": 576, "n": 1536, "dtype": "float16", "m": [1, 64, 100, 4096],
         "us": {"decode": [1, 2, 9, 90], "dequant": [5, 5, 5, 50]}}]}
    path = dispatch.user_table_dir() / f"{dispatch.device_slug(name)}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(table))
    return path


def make_layer(K, N, cfg, dtype):
    layer, raw = get_layer(K, N, cfg, bias=True)
    packed = get_packed(K, N, cfg, dtype, bias=True)
    module = HfInt4Linear(K, N, True, cfg, dtype=dtype, device="cuda", packed=True)
    module.load_state_dict(packed_state_dict(packed, layer.bias.to(dtype)))
    module.finalize()
    return module, raw


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_calls_the_path_its_plan_names(table_crossing_after_64, monkeypatch, dtype):
    cfg = _cfg(sym=False, desc_act=True, gs=64)
    module, raw = make_layer(576, 1536, cfg, dtype)
    plan = module.dispatch_plan()
    assert str(table_crossing_after_64) in plan.source
    assert [dispatch.explain(module, m).path for m in (1, 64, 65, 5000)] == ["decode", "decode", "dequant", "dequant"]
    calls = []
    for name in ("int4_gemm", "dequant_linear"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    for rows, want in ((64, "int4_gemm"), (65, "dequant_linear"), (1, "int4_gemm")):
        calls.clear()
        x = torch.randn(rows, 576, device="cuda", dtype=dtype)
        check(module(x), oracle(raw, x, module.bias), dtype, f"M={rows}")
        assert calls == [want], (rows, calls)
    # M counts every row of a [batch, seq, K] input
    calls.clear()
    module(torch.randn(4, 25, 576, device="cuda", dtype=dtype))
    assert calls == ["dequant_linear"]


def test_compiled_layer_switches_paths_by_shape_without_graph_breaks(table_crossing_after_64):
    cfg = _cfg(sym=True, gs=128)
    module, raw = make_layer(576, 1536, cfg, F16)
    compiled = torch.compile(module, fullgraph=True, dynamic=True)
    for rows in (3, 250, 7, 1000):
        x = torch.randn(rows, 576, device="cuda", dtype=F16)
        check(compiled(x), oracle(raw, x, module.bias), F16, f"compiled M={rows}")


def test_shipped_or_rule_plan_for_this_gpu_runs_every_planned_path_correctly(monkeypatch, tmp_path):
    """The plan this GPU gets for a Llama-shaped layer (shipped table or rule), run at the first M of every
    step: each planned path gives the oracle's answer through the module."""
    monkeypatch.setenv("HF_INT4_CACHE", str(tmp_path))  # no user table
    module, raw = make_layer(4096, 4096, _cfg(gs=128), F16)
    plan = module.dispatch_plan()
    assert plan.steps[0] == (1, "decode") and all(name in dispatch.PATHS for _, name in plan.steps), plan.describe()
    for first_m, name in plan.steps:
        assert dispatch.explain(module, first_m).path == name
        x = torch.randn(first_m, 4096, device="cuda", dtype=F16)
        poison_allocator(first_m * 4096 * 2)
        check(module(x), oracle(raw, x, module.bias), F16, f"{name} at M={first_m}")


def test_tune_replaces_an_unreadable_user_table(monkeypatch, tmp_path, capsys):
    """The table error tells the user to run `hf-int4 tune`, so tune must measure and write, not fail on it."""
    from hf_int4 import tune

    monkeypatch.setenv("HF_INT4_CACHE", str(tmp_path))
    table = dispatch.user_table_dir() / f"{dispatch.device_slug(torch.cuda.get_device_name())}.json"
    table.parent.mkdir(parents=True)
    table.write_text('{"entries": [')
    assert tune.main(["--shapes", "256x256", "--ms", "1,16"]) == 0
    assert "not merged" in capsys.readouterr().err
    entries = dispatch.load_table(table)["entries"]
    assert [(e["k"], e["n"], e["m"]) for e in entries] == [(256, 256, [1, 16])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym,desc_act", [(True, False), (False, True)])
def test_every_path_passes_the_gradient_to_its_input(dtype, sym, desc_act):
    """Adapters trained on top (LoRA) need d(loss)/dx through each quantized layer: every path, forced, gives
    dx = dy W^T of the GPTQ weight (and the bias its gradient), the gated input silu(gate) * up's too."""
    K, N = 512, 384
    cfg = _cfg(sym=sym, desc_act=desc_act, gs=128)
    layer, raw = get_layer(K, N, cfg, bias=True)
    packed = get_packed(K, N, cfg, dtype, bias=True)
    W = weight_from_ints(raw)  # float64 [K, N]
    props = torch.cuda.get_device_properties(0)
    spec = dispatch.LinearSpec.of(packed)
    paths = [name for name, path in dispatch.PATHS.items()
             if path.unsupported(spec) is None and path.device_unsupported(props) is None]
    assert "decode" in paths and "dequant" in paths
    gen = torch.Generator(device="cuda").manual_seed(3)
    for name in paths:
        for M in (1, 5, 33):
            x = torch.randn(M, K, device="cuda", dtype=dtype, generator=gen).requires_grad_()
            bias = layer.bias.to(dtype).clone().requires_grad_()
            dy = torch.randn(M, N, device="cuda", dtype=dtype, generator=gen)
            dispatch.PATHS[name].run(x, packed, bias).backward(dy)
            check(x.grad, dy.double() @ W.t(), dtype, f"{name} dx at M={M}")
            check(bias.grad[None], dy.double().sum(0, keepdim=True), dtype, f"{name} dbias at M={M}")
    for M in (3, 20):  # the streaming kernel's gated input, and silu_mul + the tiled kernel
        h = torch.randn(M, 2 * K + 64, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        dy = torch.randn(M, N, device="cuda", dtype=dtype, generator=gen)
        dispatch.PATHS["decode"].run_gated(h, K + 64, packed, None).backward(dy)
        h64 = h.detach().double().requires_grad_()
        (torch.nn.functional.silu(h64[:, :K]) * h64[:, K + 64:] @ W).backward(dy.double())
        check(h.grad, h64.grad, dtype, f"gated dh at M={M}")
