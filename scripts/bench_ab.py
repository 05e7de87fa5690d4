"""A/B of two builds from their benchmark JSONs (`python -m hf_int4.bench --json`) taken in one call on one machine:
per shape and M, the geometric mean new/base over every forced Hopper path, the fastest Hopper path, the dispatched
path (with its ratio to fp16 cuBLAS in each run), and two controls that a Hopper change leaves alone (fp16 cuBLAS, the
decode kernel); then per M, the geometric means over the shapes.

    python scripts/bench_ab.py NEW.json BASE.json
"""
import json
import sys
from statistics import geometric_mean as geomean


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    new, base = (json.load(open(p))["rows"] for p in argv)
    base_rows = {(r["K"], r["N"], r["M"]): r for r in base}
    per_m = {}
    for r in new:
        o = base_rows[(r["K"], r["N"], r["M"])]
        paths = [k for k in r if k.startswith("hopper") and k.endswith("_us") and r[k] and o.get(k)]
        best_new, best_base = min(r[k] for k in paths), min(o[k] for k in paths)
        row = {"paths": geomean([r[k] / o[k] for k in paths]), "best": best_new / best_base,
               "disp": r["dispatched_us"] / o["dispatched_us"], "fp16": r["fp16_us"] / o["fp16_us"],
               "decode": r["decode_us"] / o["decode_us"]}
        per_m.setdefault(r["M"], []).append(row)
        print(f"{r['K']:6}{r['N']:6}{r['M']:5} | all hopper paths new/base {row['paths']:.3f} | best hopper "
              f"{best_new:.1f}/{best_base:.1f} | dispatched {r['dispatched_us']:.1f}/{o['dispatched_us']:.1f} "
              f"({r['fp16_us'] / r['dispatched_us']:.2f}x / {o['fp16_us'] / o['dispatched_us']:.2f}x fp16) | "
              f"fp16 {row['fp16']:.3f} decode {row['decode']:.3f}")
    for m, rows in sorted(per_m.items()):
        print(f"M={m}: " + ", ".join(f"{k} {geomean([x[k] for x in rows]):.3f}" for k in rows[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
