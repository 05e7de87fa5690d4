"""GPTQ solver: the OBS updates it promises, better than RTN on correlated inputs, rounding to nearest without
correlations, valid packed layers, Hessians and sequential quantization of a whole model."""
import pytest
import torch
from torch import nn

from hf_int4.formats import GPTQConfig, GPTQLayer, gptq_solver, read_gptq_checkpoint
from hf_int4.formats.gptq_solver import PERCDAMP, collect_hessians, gptq_quantize, gptq_quantize_model, output_error_grid
from hf_int4.formats.gptq_writer import grid_of_range, group_range, pack_gptq_tensors, quantize_rtn, tiny_llama_config, write_gptq_checkpoint
from hf_int4.reference import dequantize_gptq

K, N, T = 320, 64, 2048  # K = 320: group 128 leaves a last group of 64 rows

CONFIGS = [
    GPTQConfig(group_size=gs, sym=sym, desc_act=act, checkpoint_format="gptq_v2")
    for sym in (True, False)
    for gs in (64, 128, -1)
    for act in (False, True)
]


def ids(c):
    return f"{c.checkpoint_format}-{'sym' if c.sym else 'asym'}-{'act' if c.desc_act else 'seq'}-g{c.group_size}"


def correlated_inputs(seed=0, dead=()):
    """X [T, K] of rank ~24 plus a little noise, with channels of very different scales (like LLM
    activations, which have outlier channels); columns in `dead` are always 0."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(T, 24, generator=gen) @ torch.randn(24, K, generator=gen) + 0.05 * torch.randn(T, K, generator=gen)
    X = X * torch.exp(torch.randn(K, generator=gen))
    X[:, list(dead)] = 0
    return X


def hessian(X):
    X = X.double()
    return 2 * X.t() @ X / X.shape[0]


def weight(seed=1):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05


def deq(intweight, zeros, scales, g_idx):
    """fp32 [N, K] as an nn.Linear weight."""
    g = g_idx.long()
    return (scales.float()[g] * (intweight - zeros[g]).float()).t()


def output_error(X, w, quantized):
    return (X @ (w - deq(*quantized)).t()).norm().item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_gptq_beats_rtn_on_correlated_inputs(cfg):
    X, w = correlated_inputs(), weight()
    gptq = gptq_quantize(w, hessian(X), cfg)
    rtn = quantize_rtn(w, cfg, generator=torch.Generator().manual_seed(0))
    assert output_error(X, w, gptq) < 0.8 * output_error(X, w, rtn)


@pytest.mark.parametrize("cfg", CONFIGS[1::3] + CONFIGS[3::5], ids=ids)
def test_each_row_is_rounded_after_the_optimal_update(cfg):
    # The definition GPTQ implements with Cholesky factors and lazy block updates: with rows S already
    # quantized (in its order), the remaining rows R move to the minimiser of tr((W - Q) H (W - Q)^T),
    # W_R + H_RR^-1 H_RS (W_S - Q_S) (H damped), and the next row is rounded to its group's grid,
    # chosen (output_error_grid) from its group's rows when the group is reached. Checked here by
    # direct solves in float64.
    X, w = correlated_inputs(), weight()
    H = hessian(X)
    intweight, zeros, scales, g_idx = gptq_quantize(w, H, cfg)
    order = torch.argsort(H.diagonal(), descending=True) if cfg.desc_act else torch.arange(K)
    H = (H + PERCDAMP * H.diagonal().mean() * torch.eye(K, dtype=torch.float64))[order][:, order]
    W, Wq = w.t().double()[order], deq(intweight, zeros, scales, g_idx).t().double()[order]
    g = g_idx.long()[order]
    gs = K if cfg.group_size == -1 else cfg.group_size
    same = 0
    for i in range(K):
        rows = W[i:] + torch.linalg.solve(H[i:, i:], H[i:, :i] @ (W[:i] - Wq[:i]))
        if i % gs == 0:
            _, want = output_error_grid(rows[:gs].float(), H.diagonal()[i : i + gs], cfg)
            assert scales[g[i]].eq(want[0]).float().mean() >= 0.98  # float32 vs float64 may flip a near-tie
        s, z = scales[g[i]].double(), zeros[g[i]]
        same += int(((torch.round(rows[0] / s) + z).clamp(0, 15) == intweight[order[i]]).sum())
    assert same >= 0.995 * K * N  # float32 vs float64 may flip a few near-ties


@pytest.mark.parametrize("cfg", CONFIGS + [GPTQConfig(group_size=48, sym=False, desc_act=True, checkpoint_format="gptq")], ids=ids)
def test_packs_into_a_valid_layer_that_dequantizes_to_the_result(cfg):
    # group 48 with v1: groups that start inside 128-row blocks, zeros stored as z - 1
    X, w = correlated_inputs(), weight()
    intweight, zeros, scales, g_idx = gptq_quantize(w, hessian(X), cfg, name="l")
    G = cfg.num_groups(K)
    assert (intweight.shape, zeros.shape, scales.shape, g_idx.shape) == ((K, N), (G, N), (G, N), (K,))
    assert (intweight.dtype, zeros.dtype, scales.dtype, g_idx.dtype) == (torch.int32, torch.int32, torch.float16, torch.int32)
    if cfg.sym:
        assert zeros.eq(8).all()
    gs = K if cfg.group_size == -1 else cfg.group_size
    # act-order: rows in decreasing diag(H), consecutive ones grouped; else k // group_size
    order = torch.argsort(hessian(X).diagonal(), descending=True) if cfg.desc_act else torch.arange(K)
    assert torch.equal(g_idx[order], (torch.arange(K) // gs).int())
    if cfg.desc_act:
        assert not torch.equal(order, torch.arange(K))

    layer = GPTQLayer.from_tensors("l", pack_gptq_tensors(intweight, zeros, scales, g_idx, cfg, name="l"), cfg)
    # unpack the nibbles here rather than with the reader's helpers
    shifts = torch.arange(0, 32, 4)
    q = ((layer.qweight.long().unsqueeze(1) >> shifts.view(1, 8, 1)) & 15).reshape(K, N)
    z = ((layer.qzeros.long().unsqueeze(2) >> shifts.view(1, 1, 8)) & 15).reshape(G, N)
    z = z + 1 if cfg.checkpoint_format == "gptq" else z
    g = layer.g_idx.long()
    from_file = (layer.scales.float()[g] * (q - z[g]).float()).t()
    assert torch.equal(from_file, deq(intweight, zeros, scales, g_idx))
    assert torch.equal(dequantize_gptq(layer).t(), from_file)


@pytest.mark.parametrize("cfg", CONFIGS, ids=ids)
def test_diagonal_hessian_is_rounding_to_nearest(cfg, monkeypatch):
    # Uncorrelated inputs leave no other row to absorb an error: each weight is rounded to nearest on
    # its group's grid, and with the grid search off (only the min/max range) GPTQ is exactly RTN
    # (act-order only changes which rows are grouped together).
    w = weight()
    diag = torch.rand(K, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    perm = torch.argsort(diag, descending=True) if cfg.desc_act else None
    rtn = quantize_rtn(w, cfg, act_order_perm=perm)
    intweight, zeros, scales, g_idx = gptq = gptq_quantize(w, torch.diag(diag), cfg)
    g = g_idx.long()
    assert torch.equal(intweight, ((w.t() / scales.float()[g]).round() + zeros[g]).clamp(0, 15).int())
    # the searched grid costs no more output error (with the damped H) than RTN's, column by column
    h = (diag + PERCDAMP * diag.mean()).unsqueeze(1)
    err = lambda q: (h * (w - deq(*q)).t().double() ** 2).sum(0)
    assert (err(gptq) <= err(rtn) * (1 + 1e-6)).all() and err(gptq).sum() < 0.95 * err(rtn).sum()
    monkeypatch.setattr(gptq_solver, "SHRINK_STEPS", 1)
    for a, b in zip(gptq_quantize(w, torch.diag(diag), cfg), rtn):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sym", (True, False))
def test_output_error_grid_is_the_best_shrink(sym):
    cfg = GPTQConfig(group_size=64, sym=sym, checkpoint_format="gptq_v2")
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(64, 32, generator=gen) * 0.02
    rows[torch.randint(0, 64, (32,), generator=gen), torch.arange(32)] = 0.2  # an outlier per column
    h = torch.rand(64, generator=gen, dtype=torch.float64) ** 4  # a few inputs dominate
    zeros, scales = output_error_grid(rows, h, cfg)
    xmin, xmax = group_range(rows, torch.zeros(64, dtype=torch.int32), 1, cfg)

    def cost(z, s):
        d = s.double() * ((rows / s.float()).round() + z).clamp(0, 15).double() - s.double() * z - rows.double()
        return (h[:, None] * d * d).sum(0)

    costs = torch.stack([cost(*grid_of_range((1 - i / 100) * xmin, (1 - i / 100) * xmax, cfg)) for i in range(80)])
    torch.testing.assert_close(cost(zeros, scales), costs.min(0).values, rtol=1e-5, atol=0)
    assert (costs.argmin(0) > 0).float().mean() > 0.5  # the outliers are clipped in most columns


@pytest.mark.parametrize("act", (False, True))
def test_dead_inputs(act):
    dead = [0, 5, 77, 300]
    X, w = correlated_inputs(dead=dead), weight()
    cfg = GPTQConfig(group_size=64, sym=False, desc_act=act, checkpoint_format="gptq_v2")
    gptq = gptq_quantize(w, hessian(X), cfg)
    wq = deq(*gptq)
    assert torch.isfinite(wq).all()
    assert wq[:, dead].eq(0).all()  # weights of inputs that never occur are 0, not noise
    assert output_error(X, w, gptq) < 0.8 * output_error(X, w, quantize_rtn(w, cfg, generator=torch.Generator().manual_seed(0)))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 8)

    def forward(self, ids):
        return self.b(torch.relu(self.a(self.embed(ids))))


def test_collect_hessians():
    torch.manual_seed(0)
    model = TwoLayer()
    batches = [torch.randint(0, 50, (7,)), torch.randint(0, 50, (2, 5))]  # a sequence and a [B, T] batch
    H = collect_hessians(model, batches, ["a", "b"])
    x = torch.cat([model.embed(b.reshape(-1)) for b in batches]).detach().double()
    torch.testing.assert_close(H["a"], 2 * x.t() @ x / 17)
    h = torch.relu(x @ model.a.weight.double().t() + model.a.bias.double())
    torch.testing.assert_close(H["b"], 2 * h.t() @ h / 17)
    assert not model.a._forward_hooks and not model.b._forward_hooks


def test_one_pass_without_decoder_blocks():
    # no ModuleList of blocks: every linear gets its Hessian from one pass of the float model
    torch.manual_seed(0)
    model = TwoLayer()
    batches = [torch.randint(0, 50, (16,)) for _ in range(3)]
    cfg = GPTQConfig(group_size=16, sym=False, checkpoint_format="gptq_v2")
    hessians = collect_hessians(model, batches, ["a", "b"])
    got = dict(gptq_quantize_model(model, batches, {"a": cfg, "b": cfg}))
    for name, module in (("a", model.a), ("b", model.b)):
        for x, y in zip(got[name], gptq_quantize(module.weight, hessians[name], cfg)):
            assert torch.equal(x, y)


def test_write_checkpoint_quantizes_blocks_sequentially(tmp_path):
    # Block 0's Hessians come from the float model; block 1's from the model whose block 0 holds
    # the weights written to the checkpoint. The model itself is left as it was.
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = GPTQConfig(group_size=64, sym=False, desc_act=True, checkpoint_format="gptq_v2")
    calibration = [torch.randint(0, 256, (64,)) for _ in range(4)]
    _, layers, _ = read_gptq_checkpoint(write_gptq_checkpoint(model, tmp_path / "ckpt", cfg, progress=False, calibration=calibration))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(layers) == 14  # 7 linears in each of 2 decoder layers; lm_head stays float
    block0 = [n for n in layers if n.startswith("model.layers.0.")]
    block1 = [n for n in layers if n.startswith("model.layers.1.")]
    modules = dict(model.named_modules())
    hessians = collect_hessians(model, calibration, block0)
    for name in block0:
        assert torch.equal(dequantize_gptq(layers[name]).t(), deq(*gptq_quantize(modules[name].weight, hessians[name], cfg))), name
        modules[name].weight.data = dequantize_gptq(layers[name]).t().contiguous()
    hessians = collect_hessians(model, calibration, block1)
    for name in block1:
        assert torch.equal(dequantize_gptq(layers[name]).t(), deq(*gptq_quantize(modules[name].weight, hessians[name], cfg))), name
