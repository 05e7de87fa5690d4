"""Speedup-vs-M plots (one PNG per layer shape) from a `python -m hf_int4.bench --json` file.

    python scripts/plot_bench.py docs/results/bench_dispatch_h100.json docs/results/plots

Each plot: cuBLAS time (in the run's dtype) / path time for the dispatched path (bold) and every forced path, torch's
int4 where measured, and the 1.0 line; of the Hopper configurations, the fastest at each M. Needs
matplotlib (not a dependency of hf_int4).
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [("dispatched_x", "hf_int4 (dispatched)", "k", 2.5), ("decode_x", "decode kernel", "tab:blue", 1),
          ("best_hopper_x", "Hopper (best configuration)", "tab:green", 1),
          ("dequant_x", "dequantize + cuBLAS", "tab:orange", 1), ("torch_int4_x", "torch int4 (tinygemm)", "tab:gray", 1)]


def best_hopper(row: dict):
    """The fastest Hopper configuration's ratio (one line instead of one per tile / split setting)."""
    return max((v for k, v in row.items() if k.startswith("hopper") and k.endswith("_x") and v), default=None)


def main(src: str, out_dir: str):
    data = json.loads(Path(src).read_text())
    shapes = defaultdict(list)
    for row in data["rows"]:
        shapes[(row["K"], row["N"])].append(dict(row, best_hopper_x=best_hopper(row)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = data["meta"]
    for (K, N), rows in shapes.items():
        rows.sort(key=lambda r: r["M"])
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label, color, width in SERIES:
            pts = [(r["M"], r[key]) for r in rows if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), label=label, color=color, linewidth=width, marker="." if width > 1 else None)
        ax.axhline(1.0, color="red", linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (rows = batch x tokens)")
        cublas = {"float16": "fp16", "bfloat16": "bf16"}.get(meta["dtype"], meta["dtype"])
        ax.set_ylabel(f"speedup vs {cublas} cuBLAS")
        ax.set_title(f"{K}x{N} (K x N), group {meta['group_size']}, {meta['dtype']} - {meta['device']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"speedup_{K}x{N}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
