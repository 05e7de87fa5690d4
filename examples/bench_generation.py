"""End-to-end generation speed on one GPU: a Llama-3-8B-shaped model, hf_int4 vs the same model in fp16.

    python examples/bench_generation.py [--json out.json] [--batches 1 4 16 64] [--prefill 512 2048 8192]

No hub access is needed: the model is the real Llama-3-8B *configuration* with random weights (normal,
std 0.02, made in fp16 on the GPU). The int4 model is that fp16 model quantized round-to-nearest into a
GPTQ checkpoint (group 128, symmetric, written to --workdir) and loaded the way a user loads one:
`from_pretrained(dir, quantization_config=HfInt4Config())`. Both models run side by side in this one process.

- Decode: `generate()` greedy with a static cache; transformers compiles the decode step itself
  (`torch.compile`, mode "reduce-overhead": CUDA graphs) and runs the prompt eagerly. Decode tokens/s =
  batch x (n2 - n1) / (time(n2 new tokens) - time(n1 new tokens)): same prompt, same cache size, so the
  prompt and one-off costs cancel. The first call per batch size (compilation) is timed separately.
- Decode step: the same decode step without `generate()`'s per-token Python work, as transformers' docs
  show it for static caches (a `StaticCache`, the model's forward + argmax compiled with fullgraph and
  mode "reduce-overhead"): the GPU time per token that the kernels set. Its argmax is two reductions (`greedy_token`;
  results files before session 52 used one, a one-CTA kernel of ~22 us a step).
- Prefill: one forward of batch 1 x T tokens computing only the last position's logits (what
  `generate()` needs from the prompt), CUDA events, median of repeats.
- `--pdl`: also every model's decode step compiled with inductor's programmatic dependent launch
  (`triton.enable_pdl`: its Triton kernels let the next kernel start while they finish, so our GEMMs, which
  launch early too (hf_int4/csrc/early_launch.h), can fetch weights during the norms), as fp16_pdl, int4_pdl
  (and int4_head_pdl, int4_unfused_pdl); each int4 *_pdl speedup is against fp16_pdl, fp16_pdl's against fp16.
  `--pdl only`: those steps alone (a shorter run).
- `--unfused`: also the int4 checkpoint loaded with `HfInt4Config(fuse_projections=False)` (one GEMM per
  q/k/v/gate/up layer instead of one per group, hf_int4.fusion), timed beside the others.
- `--attn sdpa_gqa`: both models with an attention function registered through transformers' `AttentionInterface`:
  SDPA that reads the 8 key/value heads as they are (`enable_gqa`). Compiled with a static cache, transformers' own
  sdpa expands them to the 32 query heads (`repeat_kv`: a copy of the whole cache per layer and step) because the
  static cache passes a mask, a cost that grows with batch x cache length and that both models pay alike.
- `--quantized-head`: also a second checkpoint whose output head (128256 x 4096, 1 GiB in fp16) is quantized too,
  as GPTQModel writes with `lm_head=True`, timed as int4_head.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, CompileConfig, LlamaConfig, StaticCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import hf_int4
from hf_int4.formats import GPTQConfig
from hf_int4.formats.gptq_writer import write_gptq_checkpoint

# Meta-Llama-3-8B's config.json (the shapes are what matter for speed).
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    bos_token_id=128000,
    eos_token_id=128001,
    tie_word_embeddings=False,
)


def make_models(workdir: str, layers: int, unfused: bool, quantized_head: bool, ungated: bool, head_only: bool):
    """({name: model} on the GPU: fp16, int4 [, int4_unfused] [, int4_head] [, int4_ungated, int4_head_ungated]; with
    `head_only` and `quantized_head` only fp16 and the head-quantized ones), seconds to load the first int4 checkpoint."""
    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device("cuda"):
        fp16 = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()

    def write(suffix, **options):
        path = os.path.join(workdir, f"llama3-8b-shaped-{layers}l-random-gptq-g128{suffix}")
        # Written every run: the weights are random, so a stale directory would belong to another model.
        write_gptq_checkpoint(fp16, path, GPTQConfig(group_size=128), max_shard_size="4GB", overwrite=True, **options)
        return path

    checkpoints = {} if head_only and quantized_head else {"int4": write("")}
    if quantized_head:
        checkpoints["int4_head"] = write("-head", modules_to_not_convert=())
    models, load_seconds = {"fp16": fp16}, None
    for name, checkpoint in checkpoints.items():
        torch.cuda.synchronize()
        start = time.perf_counter()
        models[name] = load_int4(checkpoint)
        torch.cuda.synchronize()
        load_seconds = load_seconds or time.perf_counter() - start
        if unfused and name == "int4":
            models["int4_unfused"] = load_int4(checkpoint, fuse_projections=False)
    if ungated:
        for name, checkpoint in checkpoints.items():
            models[f"{name}_ungated"] = without_gated_mlps(load_int4(checkpoint))
    for model in models.values():
        # Random weights emit any token; never stop early, so every run decodes exactly what it asks for.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return models, load_seconds


def without_gated_mlps(model):
    """The model's MLPs back on their own forward, silu(gate) * up a kernel of its own between the two GEMMs (the A/B of
    hf_int4.fusion's gated MLPs)."""
    for module in model.modules():
        if hasattr(module, "_hf_int4_gated"):
            del module.forward, module._hf_int4_gated
    return model


def sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention with the key/value heads read as they are (`enable_gqa`), mask or not."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal  # as transformers' sdpa decides
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("sdpa_gqa", sdpa_gqa_attention)
AttentionMaskInterface.register("sdpa_gqa", sdpa_mask)


def load_int4(checkpoint: str, **config):
    return AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=hf_int4.HfInt4Config(**config), device_map="cuda", dtype=torch.float16
    ).eval()


def timed_generate(model, ids, new_tokens: int, max_cache_len: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation="static",
        max_cache_len=max_cache_len,
        compile_config=CompileConfig(),
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return seconds


@torch.no_grad()
def decode_tokens_per_second(model, batch: int, prompt: int, n1: int, n2: int, repeats: int) -> dict:
    ids = torch.randint(1000, 100000, (batch, prompt), device="cuda")
    cache_len = prompt + n2
    first = timed_generate(model, ids, n2, cache_len)  # compiles the decode step for this batch size
    per_token = []
    for _ in range(repeats):
        short, long = timed_generate(model, ids, n1, cache_len), timed_generate(model, ids, n2, cache_len)
        per_token.append((long - short) / (n2 - n1))
    step = statistics.median(per_token)
    return {"tokens_per_s": batch / step, "ms_per_step": step * 1e3, "first_call_s": first}


WARMUP_STEPS = 3  # of a compiled decode step on a new cache: compile, record the CUDA graph, replay
TIMED_STEPS = 64  # per repeat


def greedy_token(logits, chunk: int = 256):
    """logits.argmax(-1, keepdim=True) in two reductions: the best of each `chunk` values, then the best chunk (the
    first maximum either way). Inductor compiles a one-row argmax over the 128256-word vocabulary into one CTA
    walking all of it (~22 us on an H100, in every model's step alike)."""
    pad = -logits.shape[-1] % chunk
    padded = torch.nn.functional.pad(logits, (0, pad), value=-float("inf")) if pad else logits
    best, where = padded.view(logits.shape[0], -1, chunk).max(-1)
    winner = best.argmax(-1, keepdim=True)
    return winner * chunk + where.gather(-1, winner)


def compiled_decode_step(model, pdl: bool = False):
    """One greedy decode step (forward of one token per sequence + argmax), compiled into CUDA graphs
    (mode "reduce-overhead"), with inductor's programmatic dependent launch if `pdl`."""

    def step(token, cache_position, cache):
        logits = model(token, cache_position=cache_position, past_key_values=cache, use_cache=True).logits
        return greedy_token(logits[:, -1])

    options = {"triton.cudagraphs": True} | ({"triton.enable_pdl": True} if pdl else {})  # cudagraphs: "reduce-overhead"
    return torch.compile(step, fullgraph=True, options=options)


def prefilled(model, batch: int, prompt: int, decode_steps: int):
    """(StaticCache, first new token, its position) after an eager prefill of random prompts, with room for
    `decode_steps` more tokens. The position stays on the GPU and advances there: a host-made tensor per step
    would synchronise the stream every token and hide the CPU's launch work behind nothing."""
    cache = StaticCache(config=model.config, max_cache_len=prompt + decode_steps)
    ids = torch.randint(1000, 100000, (batch, prompt), device="cuda")
    logits = model(ids, cache_position=torch.arange(prompt, device="cuda"), past_key_values=cache, use_cache=True).logits
    return cache, logits[:, -1].argmax(-1, keepdim=True), torch.tensor([prompt], device="cuda")


def run_steps(step, cache, token, pos, n: int):
    """`n` decode steps from `token` at `pos`, then a synchronise: (the last token, the next position)."""
    for _ in range(n):
        token, pos = step(token, pos, cache).clone(), pos + 1
    torch.cuda.synchronize()
    return token, pos


def warmed_up(model, step, batch: int, prompt: int, repeats: int):
    """(cache, token, position, seconds): a prefilled cache with room for `repeats` timed rounds, after its warm-up
    steps (compile, record the CUDA graph, replay), which took `seconds`."""
    cache, token, pos = prefilled(model, batch, prompt, WARMUP_STEPS + TIMED_STEPS * repeats)
    start = time.perf_counter()
    token, pos = run_steps(step, cache, token, pos, WARMUP_STEPS)
    return cache, token, pos, time.perf_counter() - start


@torch.no_grad()
def decode_step_tokens_per_second(model, step, batch: int, prompt: int, repeats: int) -> dict:
    cache, token, pos, first = warmed_up(model, step, batch, prompt, repeats)
    per_token = []
    for _ in range(repeats):
        begin = time.perf_counter()
        token, pos = run_steps(step, cache, token, pos, TIMED_STEPS)
        per_token.append((time.perf_counter() - begin) / TIMED_STEPS)
    ms = statistics.median(per_token)
    return {"tokens_per_s": batch / ms, "ms_per_step": ms * 1e3, "first_call_s": first}


@torch.no_grad()
def profile_decode_step(model, step, batch: int, prompt: int, repeats: int) -> str:
    """Where a compiled decode step's GPU time goes: the kernels by total CUDA time over 8 steps, on a cache of
    the measurement's size (attention's cost grows with it), warmed up as the measurement is."""
    cache, token, pos, _ = warmed_up(model, step, batch, prompt, repeats)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_steps(step, cache, token, pos, 8)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=110)


@torch.no_grad()
def prefill_ms(model, tokens: int, repeats: int) -> float:
    ids = torch.randint(1000, 100000, (1, tokens), device="cuda")
    times = []
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(ids, logits_to_keep=1, use_cache=False)
        end.record()
        end.synchronize()
        if i:  # the first call warms up (allocator, cuBLAS heuristics)
            times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def prefill_gpu_profile(model, tokens: int):
    """(GPU kernel ms, table of the kernels by CUDA time) of one eager prefill: against its measured wall time,
    says whether the prefill waits on the GPU or on the host issuing launches."""
    ids = torch.randint(1000, 100000, (1, tokens), device="cuda")
    model(ids, logits_to_keep=1, use_cache=False)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(ids, logits_to_keep=1, use_cache=False)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only: an operator's self device time repeats its kernels' (the table's "Self CUDA time total")
    gpu_ms = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    return gpu_ms, events.table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--prefill", type=int, nargs="*", default=[512, 2048, 8192])
    parser.add_argument("--decode", nargs="*", default=["step", "generate"], choices=["step", "generate"],
                        help="decode measurements: the compiled step alone, and/or generate()")
    parser.add_argument("--profile", action="store_true",
                        help="print where a decode step's GPU time goes, per batch, and each prefill's GPU kernel time")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens for the decode runs")
    parser.add_argument("--new-tokens", type=int, nargs=2, default=[32, 160], metavar=("N1", "N2"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = Llama-3-8B)")
    parser.add_argument("--workdir", default="out")
    parser.add_argument("--unfused", action="store_true", help="also time int4 without fused projections")
    parser.add_argument("--quantized-head", action="store_true",
                        help="also time a checkpoint whose output head is quantized too (GPTQModel's lm_head=True)")
    parser.add_argument("--ungated", action="store_true",
                        help="also time the int4 models with their MLPs' silu(gate) * up as a kernel of its own")
    parser.add_argument("--head-only", action="store_true",
                        help="with --quantized-head: time the head-quantized int4 models only (besides fp16)")
    parser.add_argument("--pdl", nargs="?", const="also", choices=["also", "only"],
                        help="also (`--pdl only`: only) time every decode step compiled with inductor's programmatic "
                        "dependent launch")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "sdpa_gqa"],
                        help="attention implementation of every model")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not hf_int4.extension_available():
        sys.exit("bench_generation needs a CUDA GPU and the built hf_int4 extension")

    models, load_seconds = make_models(args.workdir, args.layers, args.unfused, args.quantized_head, args.ungated,
                                       args.head_only)
    for model in models.values():
        model.set_attn_implementation(args.attn)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": f"Llama-3-8B config, {args.layers} layers, random weights; int4 = RTN GPTQ g128 sym",
        "attention": args.attn,
        "int4_checkpoint_load_s": load_seconds,
        "weights_gib": {name: sum(t.numel() * t.element_size() for t in m.state_dict().values()) / 2**30
                        for name, m in models.items()},
        "decode": [],
        "prefill": [],
        "command": " ".join(["python"] + sys.argv),
    }

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    print(f"{result['device']}: {result['model']}; int4 checkpoint loaded in {load_seconds:.1f} s")
    others = [name for name in models if name != "fp16"]
    # Prefill first: it needs no compilation, so a run cut short by a time limit still has it.
    print(f"{'prefill tokens':>14} {'fp16 ms':>9}" + "".join(f" {name + ' ms':>17} {'/fp16 time':>10}" for name in others))
    for tokens in args.prefill:
        row = {"tokens": tokens}
        for name, model in models.items():
            row[f"{name}_ms"] = prefill_ms(model, tokens, args.repeats + 2)
        if "int4" in models:
            row["time_ratio"] = row["int4_ms"] / row["fp16_ms"]
        result["prefill"].append(row)
        save()
        print(f"{tokens:>14} {row['fp16_ms']:>9.1f}"
              + "".join(f" {row[f'{name}_ms']:>17.1f} {row[f'{name}_ms'] / row['fp16_ms']:>9.3f}x" for name in others),
              flush=True)
    if args.profile:
        for row in result["prefill"]:
            for name, model in models.items():
                row[f"{name}_gpu_ms"], table = prefill_gpu_profile(model, row["tokens"])
                print(f"--- prefill profile: {name}, {row['tokens']} tokens: GPU kernels {row[f'{name}_gpu_ms']:.1f} ms "
                      f"of the {row[f'{name}_ms']:.1f} ms measured above\n{table}", flush=True)
        save()

    # Decode steps by name: one per model, and with --pdl each model again compiled with PDL. Each row but fp16
    # is divided by its baseline and stored under its speedup key (the keys of earlier result files):
    # name -> (speedup key, baseline).
    torch._dynamo.config.recompile_limit = 64  # one step function, compiled per model, batch and option set
    steps = {name: (model, compiled_decode_step(model)) for name, model in models.items()}
    speedup_of = {"int4": ("speedup", "fp16"), "int4_unfused": ("speedup_unfused", "fp16"),
                  "int4_head": ("speedup_head", "fp16"), "int4_ungated": ("speedup_ungated", "fp16"),
                  "int4_head_ungated": ("speedup_head_ungated", "fp16")}
    if args.pdl:
        pdl_steps = {f"{name}_pdl": (model, compiled_decode_step(model, pdl=True)) for name, model in models.items()}
        pdl_speedups = {f"{name}_pdl": (f"{key}_pdl", "fp16_pdl") for name, (key, _) in speedup_of.items()}
        speedup_of.update(pdl_speedups)
        if args.pdl == "only":  # fp16_pdl is then the first step: the baseline
            steps = pdl_steps
        else:
            steps.update(pdl_steps)
            speedup_of["fp16_pdl"] = ("speedup_fp16_pdl", "fp16")

    for mode in args.decode:
        names = list(steps) if mode == "step" else list(models)  # the first, fp16 or fp16_pdl, is the baseline
        print(f"decode ({mode}) {'batch':>6} {names[0] + ' tok/s':>11}"
              + "".join(f" {name + ' tok/s':>18} {'/' + speedup_of[name][1]:>9}" for name in names[1:]) + "   first call s")
        for batch in args.batches:
            row = {"mode": mode, "batch": batch}
            for name in names:
                if mode == "step":
                    model, step = steps[name]
                    row[name] = decode_step_tokens_per_second(model, step, batch, args.prompt, args.repeats)
                else:
                    row[name] = decode_tokens_per_second(models[name], batch, args.prompt, *args.new_tokens, args.repeats)
            for name in names[1:]:
                key, base = speedup_of[name]
                row[key] = row[name]["tokens_per_s"] / row[base]["tokens_per_s"]
            result["decode"].append(row)
            save()
            print(f"{'':>15}{batch:>6} {row[names[0]]['tokens_per_s']:>11.1f}"
                  + "".join(f" {row[name]['tokens_per_s']:>18.1f} {row[speedup_of[name][0]]:>8.2f}x" for name in names[1:])
                  + "   " + " / ".join(f"{row[name]['first_call_s']:.1f}" for name in names), flush=True)
    if args.profile:  # after the measurement, whose first call is then the compile it reports
        for batch in args.batches:
            for name, (model, step) in steps.items():
                print(f"--- decode step profile: {name}, batch {batch}\n{profile_decode_step(model, step, batch, args.prompt, args.repeats)}", flush=True)


if __name__ == "__main__":
    main()
