"""Run shipped recipes on the embedded default's task and compare their held-out accuracy.

Each (recipe, seed) is `mllmjax grpo --config RECIPE --seed S` (with no --model/--data an algorithm
recipe runs on the embedded default: SmolLM2-135M-Instruct on builtin:arith:level=0, 30 steps), then
`mllmjax eval` of its last checkpoint on 100 held-out problems (greedy, 160 new tokens), as the README's
embedded-default table is measured. Runs go one after another (each uses every core); the table goes
to stdout and, with --json, every number to a file.

    python scripts/compare_recipes.py --recipes embedded-default dapo gspo --seeds 0 1 --out /tmp/recipes
    python scripts/compare_recipes.py --recipes embedded-default --seeds 0 --out /tmp/lora \
        --extra "--lora-rank 16 --lr 3e-4"          # the embedded default with LoRA
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

EVAL = ["--data", "builtin:arith:level=0", "--num-prompts", "100", "--max-new-tokens", "160", "--json"]


def mllmjax(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mllmjax_cli.main", *args], capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["embedded-default", "dapo", "gspo"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", type=Path, required=True, help="folder for the run directories")
    ap.add_argument("--json", type=Path, help="write every number here too")
    ap.add_argument("--extra", default="", help="more grpo flags for every run, e.g. '--lora-rank 16'")
    args = ap.parse_args()
    rows = []
    for recipe in args.recipes:
        for seed in args.seeds:
            run = args.out / f"{recipe}-seed{seed}"
            t0 = time.perf_counter()
            done = mllmjax(
                "grpo",
                "--config",
                recipe,
                "--seed",
                str(seed),
                "--out",
                str(run),
                "--force",
                *args.extra.split(),
            )
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                sys.exit(f"{recipe} seed {seed} failed:\n{done.stderr[-2000:]}")
            last = sorted((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))[-1]
            result = mllmjax("eval", str(last), *EVAL)
            if result.returncode != 0:
                sys.exit(f"eval of {last} failed:\n{result.stderr[-2000:]}")
            summary = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append({"recipe": recipe, "seed": seed, "wall_s": wall, "checkpoint": str(last),
                         "accuracy": summary["pass_at_1"], "format": summary["format_rate"]})  # fmt: skip
            print(f"{recipe:18s} seed {seed}  {wall / 60:5.1f} min  held-out accuracy {rows[-1]['accuracy']:.2f}"
                  f"  format {rows[-1]['format']:.2f}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
