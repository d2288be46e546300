"""Scoring throughput (completions/s) on GSM8K-length completions.

Builds G completions per GSM8K test question from the gold solution, in the shapes a policy produces:
formatted right answers, formatted wrong answers, a \\boxed{} answer without tags, a bare last number,
and a truncated one; the reasoning is the gold solution written twice (a recall part and a verify part),
about the length of a real completion. Scores them with `score_records` (default rewards, grpo) after a
small warm-up call (math-verify's first import is not scoring speed), and also times the JSON Lines
round trip that `mllmjax score FILE -o FILE` adds.

--budgets times what the tests check only as behaviour, against the budgets they once asserted: the
GSM8K bar (the whole test split's gold solutions, each also with a wrong final answer: 2638
completions, budget 60 s) and the correct reward's time limit (a parse that sleeps 3 s cut off at a
1 s limit, budget 2.5 s). It prints each number beside its budget and exits 1 if one is over.

    python scripts/bench_score.py                  # 256 prompts x G=16 = 4096 completions
    python scripts/bench_score.py --workers 2 --num-prompts 64
    python scripts/bench_score.py --budgets
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


def _budget_line(what: str, seconds: float, budget: float) -> bool:
    within = seconds < budget
    print(f"{what}: {seconds:.2f} s (budget {budget:g} s){'' if within else '  OVER BUDGET'}")
    return within


def gsm8k_bar_seconds() -> tuple[int, float] | None:
    """(completions, seconds) to score tests/test_rewards.py's GSM8K bar, or None without the data."""
    if not GSM8K_TEST.is_file():
        return None
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    records = []
    for i, row in enumerate(rows):
        reasoning, final = (part.strip() for part in row["answer"].split("####"))
        gold = final.replace(",", "")
        wrong = f"{int(gold) + 1:,}" if "," in final else str(int(gold) + 1)
        for sample, shown in enumerate((final, wrong)):
            completion = f"<think>{reasoning}</think>\n<answer>{shown}</answer>"
            records.append(
                RolloutRecord(
                    prompt_id=i, group=i, sample=sample, prompt="q", prompt_ids=[1], completion=completion,
                    completion_ids=[5] * 10, logprobs=[-1.0] * 10, finish_reason="stop", answer=gold,
                    policy="bench",
                )
            )  # fmt: skip
    started = time.perf_counter()
    _, summary = score_records(records, ScoreConfig())
    elapsed = time.perf_counter() - started
    assert summary["reward_errors"] == 0, summary["reward_errors_by_name"]
    return len(records), elapsed


def time_limit_seconds(limit_s: int = 1, sleep_s: float = 3.0) -> float:
    """Seconds the correct reward takes on a parse that sleeps sleep_s, with a limit_s time limit."""
    import math_verify.parser

    from mllmjax import rewards

    real = math_verify.parser.extract_target_from_pred

    def slow(pred, *args, **kwargs):
        if pred == "1234567":
            time.sleep(sleep_s)
        return real(pred, *args, **kwargs)

    fns = rewards.resolve_rewards((("correct", 1.0),))
    rewards.evaluate_rewards(fns, "<answer>4</answer>", "4", {})  # warm-up: math-verify's imports
    previous = rewards._correct_timeout_s
    math_verify.parser.extract_target_from_pred = slow
    rewards.set_correct_timeout(limit_s)
    try:
        started = time.perf_counter()
        outcome = rewards.evaluate_rewards(fns, "<answer>1234567</answer>", "4", {})
        elapsed = time.perf_counter() - started
    finally:
        math_verify.parser.extract_target_from_pred = real
        rewards.set_correct_timeout(previous)
    assert outcome.errors["correct"].startswith("TimeoutException"), outcome
    return elapsed


def budgets() -> int:
    ok = _budget_line(
        "correct reward, a 3 s parse at a 1 s time limit, cut off after", time_limit_seconds(), 2.5
    )
    bar = gsm8k_bar_seconds()
    if bar is None:
        print(f"GSM8K bar: skipped ({GSM8K_TEST.resolve()} not found)")
    else:
        ok &= _budget_line(f"GSM8K bar, {bar[0]} completions scored in", bar[1], 60)
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("-G", "--group-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--budgets", action="store_true", help="time the tests' former budgets instead")
    args = parser.parse_args()
    if args.budgets:
        sys.exit(budgets())

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
