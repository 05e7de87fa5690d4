"""The GPTQ algorithm (Frantar et al. 2022, arXiv:2210.17323): 4-bit weights chosen with second-order error feedback.

For a linear layer with calibration inputs X [T, K] GPTQ minimises ||X W^T - X Q^T||^2 over 4-bit Q,
i.e. tr((W - Q) H (W - Q)^T) with the Hessian H = 2 X^T X / T. It quantizes the K input rows of
W^T one at a time and moves each row's rounding error onto the rows not yet quantized, weighted by
the inverse Hessian (the optimal update of the Optimal Brain Surgeon), using the upper Cholesky
factor of H^-1 and lazy updates of the remaining rows once per block of rows. The result is in
exactly the conventions of gptq_writer.quantize_rtn, so pack_gptq_tensors writes it unchanged.

Beyond the paper's basic algorithm, as GPTQ/GPTQModel practice: act-order (config.desc_act),
sequential quantization of the decoder blocks (gptq_quantize_model) and a searched grid per group
(output_error_grid). Each mattered on SmolLM2-135M at group 64 (examples/quality.py, perplexity
int4/float, asym): RTN 1.29; GPTQ with all Hessians from the float model 1.17; + act-order 1.12;
+ sequential 1.09-1.11; + searched grid 1.07 (sym: RTN 1.45, all of it 1.09). Changing only the
calibration text moves these by up to ~0.02.
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Dict, Iterable, Iterator, Mapping, Sequence, Tuple

import torch
from torch import nn

from hf_int4.formats.gptq import GPTQConfig
from hf_int4.formats.gptq_writer import _act_order_g_idx, grid_of_range, group_range, round_to_grid
from hf_int4.reference import dequantize_ints

BLOCK = 128  # rows per lazy batch update, as in the reference implementation
PERCDAMP = 0.01  # dampening: this fraction of mean(diag H) is added to the diagonal
SHRINK_STEPS = 80  # grid candidates: the min/max range times 1.00, 0.99, ..., 0.21 (GPTQModel's mse search)


class _HessianHooks:
    """While entered, accumulates X^T X of the inputs of the given nn.Linear modules."""

    def __init__(self, modules: Dict[str, nn.Linear]):
        self.modules = modules
        self.sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in modules.items()}
        self.rows = dict.fromkeys(modules, 0)

    def _accumulate(self, name, module, args, output):
        x = args[0].detach().reshape(-1, module.in_features).float()
        # one batch's X^T X in fp32 (fast), summed over batches in fp64 (no drift over many tokens)
        self.sums[name] += (x.t() @ x).double().cpu()
        self.rows[name] += x.shape[0]

    def __enter__(self):
        self.handles = [m.register_forward_hook(partial(self._accumulate, name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def hessians(self) -> Dict[str, torch.Tensor]:
        """{name: H = 2 X^T X / T (float64 [K, K])}"""
        return {name: 2 * self.sums[name] / max(self.rows[name], 1) for name in self.modules}


def _as_batch(ids: torch.Tensor, device) -> torch.Tensor:
    return ids.reshape(-1, ids.shape[-1]).to(device)


@torch.no_grad()
def collect_hessians(model: nn.Module, input_ids_batches: Iterable[torch.Tensor], linear_names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """{name: H = 2 X^T X / T (float64 [K, K])} of the nn.Linear modules `linear_names` over calibration token ids,
    all from one pass of `model` as it is. Each batch is a 1-D or [B, T] tensor of token ids on any device."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    with _HessianHooks({name: modules[name] for name in linear_names}) as hooks:
        for ids in input_ids_batches:
            model(_as_batch(ids, device))
    return hooks.hessians()


class _BlockInputs(Exception):
    """Raised by the hook that captures a decoder block's inputs, to skip the rest of the forward pass."""


def _decoder_blocks(model: nn.Module, linear_names: Sequence[str]):
    """(name, nn.ModuleList) of the decoder blocks: the ModuleList holding the most of `linear_names`, or None."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    held = [(sum(x.startswith(n + ".") for x in linear_names), n, m) for n, m in lists]
    count, name, blocks = max(held, key=lambda t: t[0], default=(0, None, None))
    return (name, blocks) if count else None


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module, input_ids_batches: Sequence[torch.Tensor], layers: Mapping[str, GPTQConfig]
) -> Iterator[Tuple[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Yield (name, gptq_quantize's result) for every nn.Linear in `layers` ({name: its settings}), quantized
    sequentially.

    The decoder blocks (the ModuleList holding the linears) are quantized in order, each block's
    Hessians taken on the outputs of the already quantized blocks before it, so that a block also
    corrects the errors of the blocks feeding it instead of compounding them. Inside a block all
    Hessians come from one pass (quantizing q/k/v, then o, then gate/up, then down each on the
    quantized outputs of the previous set, "true sequential", measured no better on SmolLM2 at twice
    the time). Linears outside the blocks get Hessians from one pass of the model with the blocks
    quantized. `model` is left unchanged (the work happens on a copy)."""
    qmodel = copy.deepcopy(model).eval()
    modules = dict(qmodel.named_modules())
    device = next(qmodel.parameters()).device
    linear_names = list(layers)
    found = _decoder_blocks(qmodel, linear_names)
    done = set()
    if found is not None:
        prefix, blocks = found
        inputs = []  # (args, kwargs) of blocks[0] per calibration batch

        def capture(module, args, kwargs):
            inputs.append((args, kwargs))
            raise _BlockInputs

        hook = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for ids in input_ids_batches:
                try:
                    qmodel(_as_batch(ids, device), use_cache=False)
                except _BlockInputs:
                    pass
        finally:
            hook.remove()
        for i, block in enumerate(blocks):
            names = [n for n in linear_names if n.startswith(f"{prefix}.{i}.")]
            with _HessianHooks({n: modules[n] for n in names}) as hooks:
                for args, kwargs in inputs:
                    block(*args, **kwargs)
            hessians = hooks.hessians()
            for name in names:
                quantized = gptq_quantize(modules[name].weight, hessians.pop(name), layers[name], name=name)
                modules[name].weight.copy_(dequantize_ints(*quantized).t())
                done.add(name)
                yield name, quantized
            # the next block's inputs: this block's outputs, now from its quantized weights
            outputs = [block(*args, **kwargs) for args, kwargs in inputs]
            inputs = [((out,) + args[1:], kwargs) for out, (args, kwargs) in zip(outputs, inputs)]
    rest = [n for n in linear_names if n not in done]
    if rest:
        hessians = collect_hessians(qmodel, input_ids_batches, rest)
        for name in rest:
            yield name, gptq_quantize(modules[name].weight, hessians.pop(name), layers[name], name=name)


def output_error_grid(rows: torch.Tensor, input_power: torch.Tensor, config: GPTQConfig, name: str = "") -> Tuple[torch.Tensor, torch.Tensor]:
    """(zeros int32 [1, N], scales fp16 [1, N]) for one group of weight rows [k, N] whose inputs have
    diag(H) `input_power` [k].

    Candidates are GPTQ's min/max range (group_range) and that range shrunk in 1% steps down to 21%;
    per column the one whose rounding error d has the least sum_k H_kk d_k^2 (the output error it
    causes, cross terms left to GPTQ's error feedback) is kept. Clipping the largest weights buys a
    finer step for all others, and weighting by H_kk clips where the inputs are small. GPTQModel's
    `mse` option searches the same shrinks, scored by sum |d|^2.4, blind to the inputs."""
    xmin, xmax = group_range(rows, torch.zeros(len(rows), dtype=torch.int32, device=rows.device), 1, config)
    h = input_power.to(rows.dtype).unsqueeze(1)

    def candidate(shrink):
        z, s = grid_of_range(shrink * xmin, shrink * xmax, config, name)
        d = s.float() * (round_to_grid(rows, z, s) - z) - rows
        return (h * d * d).sum(0, keepdim=True), z, s

    best, zeros, scales = candidate(1.0)
    for step in range(1, SHRINK_STEPS):
        err, z, s = candidate(1 - step / 100)
        better = err < best
        best, zeros, scales = torch.where(better, err, best), torch.where(better, z, zeros), torch.where(better, s, scales)
    return zeros, scales


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig, *, name: str = "") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of an nn.Linear weight [N, K] with Hessian [K, K]; returns what quantize_rtn returns:
    (intweight int32 [K, N], zeros int32 [G, N] (true zeros), scales fp16 [G, N], g_idx int32 [K]).

    Rows (input features) are quantized in order, or with config.desc_act in decreasing diag(H)
    ("act-order": the most active inputs first, while the most rows are left to absorb their error).
    Groups are consecutive rows in that order, as GPTQ writes them (g_idx[perm[i]] = i // group_size),
    and each group's grid (output_error_grid) is taken when the group is reached, from weights that
    already carry the error feedback of all earlier rows. The Hessian is dampened by 1% of its mean
    diagonal; inputs that never occurred (H_kk = 0) get weights of 0."""
    W = weight.detach().float().t().clone()  # [K, N]: row k holds input feature k's weights
    K, N = W.shape
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    # An input that was always 0 has no curvature; its weights do not matter, and 0 keeps them out of group ranges.
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[dead] = 0
    if config.desc_act:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        g_idx = _act_order_g_idx(perm, config, name)
    else:
        perm = torch.arange(K, device=W.device)
        g_idx = config.group_of_rows(K)
    W, H = W[perm], H[perm][:, perm]
    H.diagonal().add_(PERCDAMP * H.diagonal().mean())
    # Row i's error is spread over rows > i by row i of the upper Cholesky factor of H^-1, scaled by its diagonal.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    gs = K if config.group_size == -1 else config.group_size
    G = config.num_groups(K)
    zeros = torch.empty(G, N, dtype=torch.int32, device=W.device)
    scales = torch.empty(G, N, dtype=torch.float16, device=W.device)
    Q = torch.empty(K, N, device=W.device)
    # Blocks also start at every group, so a group's rows are up to date (all lazy updates applied) when its grid is taken.
    bounds = sorted(set(range(0, K, BLOCK)) | set(range(0, K, gs))) + [K]
    for i1, i2 in zip(bounds, bounds[1:]):
        g = i1 // gs
        if i1 % gs == 0:
            zeros[g : g + 1], scales[g : g + 1] = output_error_grid(W[i1 : i1 + gs], H.diagonal()[i1 : i1 + gs], config, name)
        z, s = zeros[g], scales[g].float()
        err = torch.empty(i2 - i1, N, device=W.device)
        for i in range(i1, i2):
            Q[i] = round_to_grid(W[i], z, s)
            # the error against the dequantized value that gets stored, so the feedback corrects exactly it
            err[i - i1] = (W[i] - s * (Q[i] - z)) / Hinv[i, i]
            W[i + 1 : i2].addr_(Hinv[i, i + 1 : i2], err[i - i1], alpha=-1)
        W[i2:].addmm_(Hinv[i1:i2, i2:].t(), err, alpha=-1)

    intweight = torch.empty(K, N, dtype=torch.int32, device=W.device)
    intweight[perm] = Q.to(torch.int32)
    return intweight, zeros, scales, g_idx.to(W.device)
