"""Command start-up as a user meets it: the wall time of whole `mllmjax` processes, first run (empty
compilation cache) and second run (the cache filled by the first), side by side.

    mllmjax --help
    mllmjax sample CKPT "What is 12*7?" --max-new-tokens 32      (also: time to the first token shown)
    mllmjax eval CKPT --data builtin:arith --num-prompts 16
    mllmjax sample ... --no-compile-cache                          (the second run without the cache)

CKPT defaults to SmolLM2-135M-Instruct converted once into a temporary folder (float32). Each first
run gets its own empty cache directory (MLLMJAX_CACHE), so "first" is what a new user pays and
"second" what every later run pays. Processes run one at a time, through the real entry point
(`python -m mllmjax_cli.launch`, with its malloc settings).

    python scripts/bench_startup.py                      # SmolLM2, 2 repeats of each pair
    python scripts/bench_startup.py --ckpt CKPT --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), str(ROOT)])}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache is not None:
        env["MLLMJAX_CACHE"] = str(cache)
    return env


def run(args: list[str], cache: Path | None) -> tuple[float, float | None]:
    """(wall seconds, seconds to the first byte on stdout or None) of one `mllmjax ARGS` process."""
    cmd = [sys.executable, "-m", "mllmjax_cli.launch", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_s = time.perf_counter() - start if first else None
    rest, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return wall, first_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="checkpoint (default: SmolLM2-135M converted here)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    ckpt = args.ckpt
    if ckpt is None:
        ckpt = work / "smollm2"
        wall, _ = run(["--no-compile-cache", "convert", "smollm2-135m", "-o", str(ckpt), "--dtype", "float32"],
                      work / "convert-cache")  # fmt: skip
        print(f"converted SmolLM2-135M in {wall:.1f} s")

    sample = ["sample", str(ckpt), "What is 12*7?", "--max-new-tokens", "32"]
    evaluate = ["eval", str(ckpt), "--data", "builtin:arith", "--num-prompts", "16", "-o", "EVAL"]
    rows: dict[str, list[tuple[float, ...]]] = {}
    for r in range(args.repeats):
        help_s = [run(["--help"], None)[0] for _ in range(3)]
        rows.setdefault("mllmjax --help", []).append((min(help_s), min(help_s)))
        for name, cmd in (("sample (32 tokens)", sample), ("eval (16 prompts)", evaluate)):
            cache = work / f"cache-{name.split()[0]}-{r}"
            times, counts = [], []
            for attempt in ("first", "second"):
                out = work / f"eval-{r}-{attempt}"
                wall, first = run([a if a != "EVAL" else str(out) for a in cmd], cache)
                times += [wall, first if first is not None else float("nan")]
                counts.append(len(list((cache / "xla").glob("*-cache"))))
            rows.setdefault(name, []).append(tuple(times))
            # A second run that misses the cache writes new programs: it should write none.
            print(
                f"  {name}: {counts[0]} programs cached by the first run, {counts[1] - counts[0]} new in the second"
            )
        wall, first = run(["--no-compile-cache", *sample], work / "unused")
        rows.setdefault("sample, --no-compile-cache", []).append((wall, first, wall, first))
        print(f"repeat {r + 1}/{args.repeats} done")

    print(
        f"\n{'command':32s} {'first run':>10s} {'second run':>11s} {'second/first':>13s} {'first token (1st, 2nd)':>24s}"
    )
    for name, values in rows.items():
        med = [statistics.median(v[i] for v in values) for i in range(len(values[0]))]
        if len(med) == 2:
            print(f"{name:32s} {med[0]:9.2f}s")
            continue
        first_tok = f"{med[1]:.2f}s, {med[3]:.2f}s" if name.startswith("sample") else ""
        print(f"{name:32s} {med[0]:9.2f}s {med[2]:10.2f}s {med[2] / med[0]:12.0%} {first_tok:>24s}")


if __name__ == "__main__":
    main()
