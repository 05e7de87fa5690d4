"""The main job: load a GPTQ checkpoint through transformers with HfInt4Config and generate text.

With no checkpoint given, it first writes one from the real SmolLM2-135M weights (round-to-nearest,
group 128). Runs the GPU kernels where CUDA is present and the exact reference path on CPU.

    python examples/demo.py [--checkpoint GPTQ_DIR] [--prompt "..."] [--max-new-tokens 40]
"""
import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_int4  # registers the hf_int4 quantization method
from hf_int4.smollm2 import make_gptq_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a GPTQ checkpoint directory (default: SmolLM2-135M quantized here)")
    parser.add_argument("--workdir", default="out", help="where the SmolLM2 GPTQ checkpoint is written")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()

    checkpoint = args.checkpoint or make_gptq_checkpoint(os.path.join(args.workdir, "smollm2-135m-gptq-g128"))
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    print(f"hf_int4 {hf_int4.__version__}: loading {checkpoint} on {device} ({dtype}); CUDA kernels built: {hf_int4.extension_available()}")

    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, quantization_config=hf_int4.HfInt4Config(), device_map=device, dtype=dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    layer = next(m for m in model.modules() if isinstance(m, hf_int4.HfInt4Linear))
    print(f"first quantized layer: {layer.name}: {layer.extra_repr()}")

    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(device)
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    print(f"prompt: {args.prompt}")
    print(f"answer: {tokenizer.decode(new_tokens, skip_special_tokens=True).strip()}")
    print(f"{len(new_tokens)} tokens in {seconds:.2f} s ({len(new_tokens) / seconds:.1f} tokens/s, greedy)")


if __name__ == "__main__":
    main()
