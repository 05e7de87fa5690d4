"""`hf-int4`: repack GPTQ checkpoints into hf_int4's layout, inspect checkpoints, tune the dispatch."""
import argparse
import sys

import torch


def device(name: str) -> torch.device:
    """--device's value, checked where argparse reports a bad one as a usage error instead of a traceback."""
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name}: no CUDA device is available")
    return dev


def main(argv=None):
    parser = argparse.ArgumentParser(prog="hf-int4", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("repack", help="convert a GPTQ checkpoint into a packed hf_int4 checkpoint")
    rp.add_argument("gptq_dir")
    rp.add_argument("out_dir")
    rp.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="activation dtype to pack for")
    rp.add_argument("--device", type=device, help="where to pack (default: cuda when the kernels are available, else cpu)")
    rp.add_argument("--max-shard-size", default="4GB", type=lambda s: int(s) if s.isdigit() else s,
                    help="bytes, or as save_pretrained takes it: 5GB (10^9 bytes), 5GiB (2^30), MB, KB")
    rp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    ins = sub.add_parser("inspect", help="print a checkpoint's format, variants, layer count and size")
    ins.add_argument("checkpoint_dir")
    from hf_int4 import tune

    tune.add_arguments(sub.add_parser("tune", help="measure each kernel path on this GPU and write the dispatch table"))
    args = parser.parse_args(argv)
    if args.command == "tune":
        return tune.run(args)

    from hf_int4.convert import describe_checkpoint, repack_checkpoint
    from hf_int4.formats.gptq import GPTQFormatError

    try:
        if args.command == "repack":
            out = repack_checkpoint(
                args.gptq_dir, args.out_dir, dtype=getattr(torch, args.dtype), device=args.device,
                overwrite=args.overwrite, max_shard_size=args.max_shard_size,
            )
            print(f"wrote {out}")
        else:
            info = describe_checkpoint(args.checkpoint_dir)
            for key, value in info.items():
                shown = f"{value / 2**20:.1f} MiB" if key == "size_bytes" else value
                print(f"{key:>16}: {shown}")
    except (GPTQFormatError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"hf-int4 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
