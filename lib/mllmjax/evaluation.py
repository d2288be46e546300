"""Held-out evaluation: accuracy (pass@1), pass@k, maj@k and format rate of a policy.

Definitions, with k completions per problem (k = 1 and greedy decoding by default):
- pass@1: the mean correctness over all k x N completions (the unbiased pass@1 estimate for k samples).
- pass@k: the fraction of problems with at least one correct completion among its k.
- maj@k: the fraction of problems whose majority answer is correct. The vote is over the extracted
  predictions (`<answer>`, else `\\boxed{}`, else the last number), thousands separators and surrounding
  space removed; completions with no prediction do not vote; ties go to the answer seen first.
- format: the fraction of completions in the strict `<think>..</think>\\n<answer>..</answer>` form.
Correctness is the `correct` reward of `mllmjax score` (math-verify against the gold answer), so eval and
training agree on what counts as right.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

from mllmjax.records import RolloutRecord
from mllmjax.rewards import correct_reward, extract_prediction, format_reward


@dataclasses.dataclass(frozen=True)
class EvalResult:
    problems: int
    k: int
    pass_at_1: float
    pass_at_k: float
    maj_at_k: float
    format_rate: float
    mean_tokens: float
    truncation_rate: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _normalise(prediction: str) -> str:
    return prediction.replace(",", "").strip()


def summarize(records: Sequence[RolloutRecord]) -> tuple[EvalResult, list[dict[str, float]]]:
    """Metrics over rollout records (k per group); also each completion's correct/format values."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.group, []).append(i)
    per: list[dict[str, float]] = []
    for r in records:
        per.append(
            {
                "correct": correct_reward(r.completion, r.answer, {}),
                "format": format_reward(r.completion, r.answer, {}),
            }
        )
    k = max(len(v) for v in groups.values())
    solved = majority = 0
    for members in groups.values():
        solved += any(per[i]["correct"] for i in members)
        votes = Counter()
        first_correct: dict[str, float] = {}
        for i in members:
            pred = extract_prediction(records[i].completion)
            if pred:
                key = _normalise(pred)
                votes[key] += 1
                first_correct.setdefault(key, per[i]["correct"])
        if votes:
            top = max(votes.values())
            winner = next(key for key in votes if votes[key] == top)  # insertion order: first seen
            majority += first_correct[winner]
    n = len(records)
    result = EvalResult(
        problems=len(groups),
        k=k,
        pass_at_1=sum(p["correct"] for p in per) / n,
        pass_at_k=solved / len(groups),
        maj_at_k=majority / len(groups),
        format_rate=sum(p["format"] for p in per) / n,
        mean_tokens=sum(len(r.completion_ids) for r in records) / n,
        truncation_rate=sum(r.finish_reason == "length" for r in records) / n,
    )
    return result, per
