"""Overlay one metric of several grpo runs in one PNG (e.g. the README's embedded-default curve).

Reads RUN/metrics.jsonl of each run; plots the metric per step, raw (thin) and as a running mean over
--window steps (thick), with optional extra points given as STEP:VALUE (e.g. held-out accuracy measured
with `mllmjax eval` before and after).

    python scripts/plot_runs.py runs/seed0 runs/seed1 --key accuracy -o curve.png \
        --points "runs/seed0=0:0.06,18:0.27" --points "runs/seed1=0:0.06,18:0.25"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--key", default="accuracy")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--title", default=None)
    ap.add_argument("--points", action="append", default=[], help="RUN=STEP:VALUE,STEP:VALUE (held-out)")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()

    import matplotlib

    from mllmjax.grpo.run_dir import read_metrics

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = {}
    for spec in args.points:
        run, _, pts = spec.partition("=")
        extra[Path(run)] = [tuple(float(x) for x in p.split(":")) for p in pts.split(",") if p]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for i, run in enumerate(args.runs):
        # Step 0 is the evaluation before training: no training metrics.
        rows = read_metrics(run)
        pts = [(r["step"], r[args.key]) for r in rows if r.get(args.key) is not None and r["step"] > 0]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        color = f"C{i}"
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
        smooth = [sum(ys[max(0, j - args.window + 1) : j + 1]) / len(ys[max(0, j - args.window + 1) : j + 1])
                  for j in range(len(ys))]  # fmt: skip
        ax.plot(
            xs,
            smooth,
            color=color,
            linewidth=2,
            label=f"{run.name}: train {args.key} (mean of {args.window})",
        )
        if run in extra:
            ex, ey = zip(*extra[run], strict=True)
            ax.plot(
                ex, ey, "o--", color=color, markersize=7, label=f"{run.name}: held-out greedy (mllmjax eval)"
            )
    ax.set_xlabel("step")
    ax.set_ylabel(args.key)
    ax.set_title(args.title or args.key)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
