"""Which path each dispatch plan takes at the Ms of one benchmark run, and its ratio to fp16, from that run's forced
times (docs/results/offgrid_plans_h200.txt, docs/results/plans_midtiles_h200.txt):

    python scripts/compare_plans.py BENCH.json [--lower GRID_TABLE.json] NAME=TABLE.json ...

Each NAME=TABLE.json column is hf_int4.dispatch's plan on that table (the path fastest at the grid point at or above
M). --lower adds session 29's rule on a table (the path fastest at the grid point at or below M, no 16-token tiles),
kept only for this comparison. `best` is the fastest forced path of the run. A plan's path that the run did not time
(a path added since) is reported as missing.
"""
import argparse
import json
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


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("bench")
    parser.add_argument("--lower", help="a table read with session 29's rule")
    parser.add_argument("tables", nargs="+", metavar="NAME=TABLE.json")
    args = parser.parse_args(argv)
    bench = json.load(open(args.bench))
    tables = {name: json.load(open(path)) for name, path in (t.split("=", 1) for t in args.tables)}
    lower = json.load(open(args.lower)) if args.lower else None
    print(f"# python scripts/compare_plans.py {' '.join(argv)}")
    columns = (["lower"] if lower else []) + list(tables) + ["best"]
    print(f"{'K x N':>11} {'M':>5} {'fp16_us':>8}" + "".join(f"  {c:<26}{'x':>6}" for c in columns))
    ratios = {c: [] for c in columns}
    for r in bench["rows"]:
        spec = dispatch.LinearSpec(r["K"], r["N"], bench["meta"]["group_size"], True, False,
                                   getattr(torch, bench["meta"]["dtype"]))
        forced = {k[:-3]: v for k, v in r.items() if k.endswith("_us") and v is not None and k[:-3] in dispatch.PATHS}
        choice = {name: dispatch.plan_from_table(t, spec, name).path_name(r["M"]) for name, t in tables.items()}
        if lower:
            choice = {"lower": lower_rule(lower, spec, r["M"]), **choice}
        choice["best"] = min(forced, key=forced.get)
        line = f"{r['K']:>5}x{r['N']:<5} {r['M']:>5} {r['fp16_us']:8.1f}"
        for column, path in choice.items():
            if path not in forced:
                line += f"  {path + ' (not timed)':<32}"
                continue
            x = r["fp16_us"] / forced[path]
            ratios[column].append(x)
            line += f"  {path:<26}{x:6.2f}"
        print(line)
    print()
    for column, xs in ratios.items():
        mean = statistics.geometric_mean(xs)
        print(f"{column:>6}: geometric mean {mean:.3f}x, min {min(xs):.2f}x, "
              f"{sum(x < 0.97 for x in xs)} of {len(xs)} points below 0.97x")


if __name__ == "__main__":
    main(sys.argv[1:])
