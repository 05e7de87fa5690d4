"""`hf-int4 tune`: measure where each kernel path wins on this GPU and write the dispatch table.

    hf-int4 tune [--shapes 4096x4096,...] [--ms 1,2,...] [--dtype float16] [--asym] [--out PATH]

Times every hf_int4 path (hf_int4.dispatch.PATHS) forced, for each layer shape and M, the way the
benchmark does (CUDA-graph replays over rotating weight copies, median), and writes the table to the
user cache (`$HF_INT4_CACHE/tables/<gpu>.json`, default ~/.cache/hf_int4), where hf_int4.dispatch
finds it automatically from then on: layers planned afterwards (new loads) use it. `--asym` measures
asymmetric weights (zero points): their entries serve asymmetric layers, symmetric ones the others (each falls
back to the other's where its own shape was not measured). Entries of the table this GPU used before (the
user's, else the shipped one) for other shapes, dtypes, group sizes or variants are kept,
so tuning bfloat16 does not discard float16; a shape measured again at other Ms (`--ms`) with the same paths or
more gains those Ms, the Ms measured again taking the new times (paths added since: not timed at the others).
Delete the file to start afresh.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hf_int4 import bench, dispatch

TABLE_VERSION = 1
# The benchmark's shapes (q/k/v and gate/up fused, as serving stacks hold them) plus the separate k/v and
# gate/up projections that a transformers Llama-3-8B calls: every layer then finds its own measured shape.
TUNE_SHAPES = bench.LLAMA3_8B_SHAPES + [(4096, 1024), (4096, 14336)]
# The benchmark's Ms plus one between each pair above 128: the plan serves M with the path fastest at the grid
# point at or above it, and (H200, 8192x8192) the path fastest at 1536 ran 12% slower than the fastest at M = 1280.
TUNE_MS = sorted(bench.DEFAULT_MS + [160, 224, 320, 448, 640, 896, 1280, 1792, 3072, 6144])


def measure_table(shapes, ms, dtype: torch.dtype, group_size: int, sym: bool = True, log=print) -> dict:
    """{"device", ..., "entries": [{"k", "n", "dtype", "group_size", "sym", "m": [...], "us": {path: [...]}}]} for
    this GPU."""
    entries = []
    for K, N in shapes:
        shape = bench.Shape(K, N, group_size, dtype, sym=sym)
        names = shape.runnable_paths()
        us = {name: [] for name in names}
        for M in ms:
            row = shape.time_paths(M, names)
            timed = [name for name in names if f"{name}_us" in row]  # the others' max_m is below M
            for name in names:
                us[name].append(round(row[f"{name}_us"], 2) if name in timed else None)
            best = min(timed, key=lambda name: row[f"{name}_us"])
            log(f"{K:>6} {N:>6} {M:>5} " + " ".join(f"{name} {row[f'{name}_us']:9.1f}" for name in timed)
                + f"  -> {best}")
        entries.append({"k": K, "n": N, "dtype": str(dtype).replace("torch.", ""), "group_size": group_size,
                        "sym": sym, "m": list(ms), "us": us})
        del shape
        torch.cuda.empty_cache()
    return {
        "version": TABLE_VERSION,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "measured": time.strftime("%Y-%m-%d"),
        "method": "CUDA-graph replays over rotating weight copies (> 4x L2), paths interleaved in a new random order each round, each timed replay after an untimed one, median of 7 (hf_int4.bench)",
        "entries": entries,
    }


def entry_key(entry: dict) -> tuple:
    return entry["k"], entry["n"], entry["dtype"], entry.get("group_size"), entry.get("sym", True)


def merge_entries(old: dict, new: dict) -> dict:
    """One key measured twice: `new`, plus `old`'s Ms that `new` did not measure if `new` timed every path `old`
    did (the plan compares paths at one M, all timed in one run; at old Ms a path new to `new` is null, not timed,
    so the plan never picks it there); else `new` alone."""
    if not set(old["us"]) & set(dispatch.PATHS) <= set(new["us"]):  # (paths removed since: no plan reads them)
        return new
    times = {m: {name: old["us"][name][i] if name in old["us"] else None for name in new["us"]}
             for i, m in enumerate(old["m"])}
    times.update({m: {name: new["us"][name][i] for name in new["us"]} for i, m in enumerate(new["m"])})
    ms = sorted(times)
    return dict(new, m=ms, us={name: [times[m][name] for m in ms] for name in new["us"]})


def merge_tables(previous: dict, measured: dict) -> dict:
    """`measured`, plus the entries of `previous` (the same GPU model's table) for keys it did not measure, and
    the Ms of `previous`'s entries that it did not measure again (merge_entries).

    A kept entry carries the date it was measured (its own, else its table's); the previous table's other
    top-level keys (notes written by hand, e.g. "dropped") stay unless `measured` sets them."""
    if previous.get("device") != measured["device"]:
        return measured
    old_entries = {entry_key(e): e for e in previous.get("entries", [])}
    new_keys = {entry_key(e) for e in measured["entries"]}
    kept = [dict(e, measured=e.get("measured", previous.get("measured")))
            for key, e in old_entries.items() if key not in new_keys]
    remeasured = [merge_entries(old_entries[entry_key(e)], e) if entry_key(e) in old_entries else e
                  for e in measured["entries"]]
    return {**previous, **measured, "entries": kept + remeasured}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="hf-int4 tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser):
    parser.add_argument("--shapes", type=bench.shape_list, default=TUNE_SHAPES,
                        help="layer shapes KxN (in_features x out_features), comma separated")
    parser.add_argument("--ms", type=bench.m_list, default=TUNE_MS, help="row counts M to measure, comma separated")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--group-size", type=bench.group_size, default=128)
    parser.add_argument("--asym", action="store_true", help="asymmetric weights (zero points), not symmetric")
    parser.add_argument("--out", help="table path (default: the user cache, used automatically)")


def run(args) -> int:
    if not torch.cuda.is_available():
        print("hf-int4 tune: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    from hf_int4._extension import extension_available

    if not extension_available():
        print("hf-int4 tune: error: the CUDA extension hf_int4._C is not built", file=sys.stderr)
        return 2
    if args.out and Path(args.out).is_dir():  # found out now, not after the measurements
        print(f"hf-int4 tune: error: --out {args.out} is a directory; give the table's file path", file=sys.stderr)
        return 2
    shapes, ms = args.shapes, sorted(set(args.ms))
    torch.manual_seed(0)
    table = measure_table(shapes, ms, getattr(torch, args.dtype), args.group_size, sym=not args.asym)
    out = Path(args.out) if args.out else dispatch.user_table_dir() / f"{dispatch.device_slug(table['device'])}.json"
    previous = out if out.is_file() else dispatch.table_path_for(table["device"])
    try:
        previous_table = dispatch.load_table(previous) if previous is not None else None
    except ValueError as exc:  # do not lose the measurements: write them alone
        print(f"hf-int4 tune: warning: {exc}; not merged", file=sys.stderr)
        previous_table = None
    if previous_table is not None:
        table = merge_tables(previous_table, table)
        print(f"kept {len(table['entries']) - len(shapes)} entries of {previous} for other shapes, dtypes or "
              "variants, and the Ms not measured again of the shapes measured where every path timed before was timed "
              "again")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(out)  # never a half-written table where dispatch looks
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
