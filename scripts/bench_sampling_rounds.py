"""What a dynamic-sampling round costs by the number of groups it decodes: the embedded default's work
(SmolLM2-135M float32, builtin:arith:level=0 prompts, G=8 at temperature 1, top-k 50, 128 new tokens,
stopping on the checkpoint's stop ids), rounds of 1, 2, 4 and 8 groups (8 to 64 rows). The first
call of each size compiles; the median of the others is what a round costs in a run.

`grpo --dynamic-sampling` decodes at least --batch-size / G groups per round, so whether over-sampling
saves time on a machine is: (time of a k-group round) against (1-group round) x (expected rounds of one
group each until one has signal).

    python scripts/bench_sampling_rounds.py                 # SmolLM2 converted here
    python scripts/bench_sampling_rounds.py --ckpt CKPT --groups 1 2 4 --repeats 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="checkpoint (default: SmolLM2-135M converted here, float32)")
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of each size, after the first")
    args = ap.parse_args()
    from mllmjax.runtime import reexec_with_malloc_tuning

    reexec_with_malloc_tuning([sys.executable, *sys.argv])  # the process settings the CLI runs with
    from bench_shared_prefix import smollm2_checkpoint, task_prompts

    ckpt = smollm2_checkpoint(args.ckpt)
    from mllmjax.checkpoint import load_checkpoint, read_stop_ids
    from mllmjax.sampling import Sample, generate

    ck, stops = load_checkpoint(ckpt), read_stop_ids(ckpt)
    prompts = task_prompts(ckpt, "builtin:arith:level=0", 64)
    base = None
    print(f"{'groups':>6s} {'rows':>5s} {'first s':>8s} {'round s':>8s} {'ratio':>10s} {'mean tokens':>12s}")
    for groups in args.groups:
        times, lengths = [], []
        for rep in range(args.repeats + 1):
            batch = [prompts[(rep * groups + i) % len(prompts)] for i in range(groups)]
            t = time.perf_counter()
            out = generate(ck.params, ck.cfg, batch, Sample(temperature=1.0, top_k=50), n=8, max_new_tokens=128,
                           stop_ids=stops, seed=rep, max_batch=groups * 8)  # fmt: skip
            times.append(time.perf_counter() - t)
            lengths.append(statistics.mean(len(c.ids) for c in out))
        median = statistics.median(times[1:])
        base = base or median
        print(f"{groups:6d} {groups * 8:5d} {times[0]:8.1f} {median:8.2f} {median / base:10.2f} "
              f"{statistics.mean(lengths):12.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
