"""Which path each dispatch plan takes at Ms off the tune grid, and its ratio to fp16, from one benchmark run's forced
times (docs/results/offgrid_plans_h200.txt):

    python scripts/offgrid_plans.py BENCH.json GRID_TABLE.json DENSE_TABLE.json

`lower` is session 29's rule and paths (the path fastest at the grid point at or below M, no 16-token tiles), kept
here only for this comparison; `upper` is hf_int4.dispatch's rule on GRID_TABLE; `dense` the same on DENSE_TABLE (the
grid table with the tune's Ms between merged in); `best` the fastest forced path of the run.
"""
import json
import math
import statistics
import sys

import torch

from hf_int4 import dispatch


def lower_rule(table, spec, m):
    e = dispatch._nearest_entry(table["entries"], spec)
    i = max(j for j, g in enumerate(e["m"]) if g <= m)
    timed = {n: t[i] for n, t in e["us"].items()
             if t[i] is not None and "_t16_" not in n and dispatch.PATHS[n].unsupported(spec) is None}
    return min(timed, key=timed.get)


def main(bench_path, grid_path, dense_path):
    bench = json.load(open(bench_path))
    grid, dense = json.load(open(grid_path)), json.load(open(dense_path))
    print(f"# python scripts/offgrid_plans.py {bench_path} {grid_path} {dense_path}")
    print(f"{'K x N':>11} {'M':>5} {'fp16_us':>8}  {'lower':<26}{'x':>6}  {'upper':<26}{'x':>6}  {'dense':<26}{'x':>6}  "
          f"{'best':<26}{'x':>6}")
    ratios = {"lower": [], "upper": [], "dense": [], "best": []}
    for r in bench["rows"]:
        spec = dispatch.LinearSpec(r["K"], r["N"], 128, True, False, torch.float16)
        forced = {k[:-3]: v for k, v in r.items() if k.endswith("_us") and v is not None and k[:-3] in dispatch.PATHS}
        choice = {"lower": lower_rule(grid, spec, r["M"]),
                  "upper": dispatch.plan_from_table(grid, spec, "grid").path_name(r["M"]),
                  "dense": dispatch.plan_from_table(dense, spec, "dense").path_name(r["M"]),
                  "best": min(forced, key=forced.get)}
        line = f"{r['K']:>5}x{r['N']:<5} {r['M']:>5} {r['fp16_us']:8.1f}"
        for column, path in choice.items():
            x = r["fp16_us"] / forced[path]
            ratios[column].append(x)
            line += f"  {path:<26}{x:6.2f}"
        print(line)
    print()
    for column, xs in ratios.items():
        mean = math.exp(statistics.fmean(math.log(x) for x in xs))
        print(f"{column:>6}: geometric mean {mean:.3f}x, min {min(xs):.2f}x, "
              f"{sum(x < 0.97 for x in xs)} of {len(xs)} points below 0.97x")


if __name__ == "__main__":
    main(*sys.argv[1:4])
