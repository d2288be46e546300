"""The sampler's shared-prefix prefill: the built-in tasks' prompts share their system prompt and worked
examples (279 of ~310 tokens on SmolLM2); `generate` prefills that prefix once per batch instead of once
per prompt. Times `generate` on real task prompts with it on and off, alternating per repeat, after one
warm-up call of each (its time, compilation included, is reported apart).

    python scripts/bench_shared_prefix.py                          # SmolLM2-135M float32, batch 64 and 8x8
    python scripts/bench_shared_prefix.py --ckpt CKPT --prompts 64 --new-tokens 128 --repeats 3

Rows: "eval" decodes --prompts prompts one completion each, greedy, in one batch; "rollout" decodes
--prompts / 8 prompts x 8 samples at temperature 1 (a grpo round that fills a 64-row batch).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT)]


def smollm2_checkpoint(ckpt: Path | None) -> Path:
    """ckpt, or SmolLM2-135M-Instruct converted (float32) into a temporary folder when it is None."""
    if ckpt is None:
        ckpt = Path(tempfile.mkdtemp(prefix="bench_smollm2_")) / "smollm2"
        subprocess.run([sys.executable, "-m", "mllmjax_cli.launch", "--no-compile-cache", "convert", "smollm2-135m",
                        "-o", str(ckpt), "--dtype", "float32"], check=True, capture_output=True)  # fmt: skip
    return ckpt


def task_prompts(ckpt: Path, data: str, num: int) -> list[list[int]]:
    """The token ids of the first `num` prompts of `data`, as rollout and eval build them."""
    from mllmjax.data import load_problems
    from mllmjax.prompts import build_prompt
    from mllmjax.tokenizer import load_tokenizer

    tok = load_tokenizer(ckpt)
    return [
        tok(build_prompt(tok, p.question), add_special_tokens=False)["input_ids"]
        for p in load_problems(data, num=num)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="checkpoint (default: SmolLM2-135M converted here, float32)")
    ap.add_argument("--data", default="builtin:arith")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from mllmjax.runtime import reexec_with_malloc_tuning

    reexec_with_malloc_tuning([sys.executable, *sys.argv])  # the process settings the CLI runs with
    ckpt = smollm2_checkpoint(args.ckpt)
    from mllmjax.checkpoint import load_checkpoint
    from mllmjax.sampling import Greedy, Sample, generate, sampler

    ck = load_checkpoint(ckpt)
    prompts = task_prompts(ckpt, args.data, args.prompts)
    lengths = [len(p) for p in prompts]
    print(
        f"{args.data}: {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, shared prefix prefilled "
        f"once: {sampler.shared_prefix(prompts)} tokens; {args.new_tokens} new tokens (stop ids ignored)"
    )
    cases = {
        "eval (greedy, 1 per prompt)": (prompts, Greedy(), 1),
        "rollout (8 per prompt, T=1)": (
            prompts[: max(1, len(prompts) // 8)],
            Sample(temperature=1.0, top_k=50),
            8,
        ),
    }
    print(f"{'case':30s} {'on: s':>7s} {'off: s':>7s} {'off/on':>7s} {'first call on/off s':>20s}")
    for name, (batch, strategy, n) in cases.items():

        def once(share: bool, batch=batch, strategy=strategy, n=n) -> float:
            t = time.perf_counter()
            generate(ck.params, ck.cfg, batch, strategy, n=n, max_new_tokens=args.new_tokens, seed=1,
                     max_batch=len(batch) * n, share_prefix=share)  # fmt: skip
            return time.perf_counter() - t

        compile_s = (once(True), once(False))
        on, off = [], []
        for _ in range(args.repeats):
            on.append(once(True))
            off.append(once(False))
        a, b = statistics.median(on), statistics.median(off)
        print(f"{name:30s} {a:7.2f} {b:7.2f} {b / a:7.2f} {compile_s[0]:11.1f}/{compile_s[1]:.1f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
