"""Scoring throughput (completions/s) on GSM8K-length completions.

Builds G completions per GSM8K test question from the gold solution, in the shapes a policy produces:
formatted right answers, formatted wrong answers, a \\boxed{} answer without tags, a bare last number,
and a truncated one; the reasoning is the gold solution written twice (a recall part and a verify part),
about the length of a real completion. Scores them with `score_records` (default rewards, grpo) after a
small warm-up call (math-verify's first import is not scoring speed), and also times the JSON Lines
round trip that `mllmjax score FILE -o FILE` adds.

    python scripts/bench_score.py                  # 256 prompts x G=16 = 4096 completions
    python scripts/bench_score.py --workers 2 --num-prompts 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT)]

from mllmjax.records import RolloutRecord, read_records, write_records  # noqa: E402
from mllmjax.scoring import ScoreConfig, score_records  # noqa: E402

GSM8K_TEST = ROOT / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"
FALLBACK = [
    {
        "question": "Janet's ducks lay 16 eggs per day...",
        "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
        "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18",
    }
]


def build(num_prompts: int, group_size: int) -> list[RolloutRecord]:
    rows = (
        [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
        if GSM8K_TEST.is_file()
        else FALLBACK
    )
    records = []
    for i in range(num_prompts):
        row = rows[i % len(rows)]
        reasoning, final = (part.strip() for part in row["answer"].split("####"))
        gold = final.replace(",", "")
        think = f"Recall: {reasoning}\nVerify: {reasoning}"
        shapes = [
            f"<think>{think}</think>\n<answer>{final}</answer>",
            f"<think>{think}</think>\n<answer>{int(gold) + 1}</answer>",
            f"{think}\nSo the answer is \\boxed{{{final}}}.",
            f"{think}\nThe total is {final} in the end.",
            f"<think>{think}</think>\n<answer>{final}",
        ]
        for s in range(group_size):
            completion = shapes[s % len(shapes)]
            n = max(1, len(completion) // 4)  # ~4 characters per token
            records.append(
                RolloutRecord(
                    prompt_id=i,
                    group=i,
                    sample=s,
                    prompt=row["question"],
                    prompt_ids=list(range(len(row["question"]) // 4)),
                    completion=completion,
                    completion_ids=list(range(n)),
                    logprobs=[-0.5] * n,
                    finish_reason="length" if s % len(shapes) == 4 else "stop",
                    answer=gold,
                    policy="bench",
                )
            )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("-G", "--group-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()

    records = build(args.num_prompts, args.group_size)
    config = ScoreConfig(workers=args.workers)
    score_records(records[: args.group_size], config)  # warm-up: imports math-verify / sympy
    started = time.perf_counter()
    scored, summary = score_records(records, config)
    elapsed = time.perf_counter() - started
    chars = sum(len(r.completion) for r in records) / len(records)
    print(
        f"score_records: {len(records)} completions (mean {chars:.0f} chars, "
        f"~{summary['completion_tokens']['mean']:.0f} tokens), workers={args.workers}: "
        f"{elapsed:.2f} s, {len(records) / elapsed:.0f} completions/s "
        f"(accuracy {summary['accuracy']:.3f}, reward errors {summary['reward_errors']})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "r.jsonl", Path(tmp) / "s.jsonl"
        write_records(records, src)
        started = time.perf_counter()
        scored, _ = score_records(read_records(src), config)
        write_records(scored, dst)
        elapsed = time.perf_counter() - started
    print(f"read + score + write JSONL: {len(records) / elapsed:.0f} completions/s")


if __name__ == "__main__":
    main()
