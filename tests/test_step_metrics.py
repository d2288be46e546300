"""The values of a GRPO step's metrics row, beyond the mean reward, on hand-made records and updates.

The score summary of one round and of several dynamic-sampling rounds (which must describe the union
of their records: accuracy, reward spread, truncation rate, zero-variance fraction, lengths of correct
and incorrect completions), and the step's aggregate of its updates (clip fractions, ratio extremes,
the sampler/trainer log-prob gap), each against numbers worked out by hand or with numpy on the records.
"""

from __future__ import annotations

import numpy as np
import pytest

from mllmjax.grpo.stages import merge_summaries, summary_metrics, update_metrics
from mllmjax.records import RolloutRecord
from mllmjax.scoring import ScoreConfig, score_records


def _record(group: int, sample: int, answer: str, n_tokens: int, finish: str = "stop") -> RolloutRecord:
    """A completion that answers `answer` to a problem whose gold answer is 4, n_tokens long."""
    return RolloutRecord(
        prompt_id=f"p{group}", group=group, sample=sample, prompt="q", prompt_ids=[1, 2],
        completion=f"<answer>{answer}</answer>", completion_ids=[5] * n_tokens, logprobs=[-1.0] * n_tokens,
        finish_reason=finish, answer="4", policy="test",
    )  # fmt: skip


# Round 1: group 0 gets 3 of 4 right, group 1 none (zero variance); one truncated completion.
ROUND1 = [
    _record(0, 0, "4", 10), _record(0, 1, "4", 20), _record(0, 2, "4", 30), _record(0, 3, "7", 40, "length"),
    _record(1, 0, "5", 8), _record(1, 1, "6", 8), _record(1, 2, "7", 8), _record(1, 3, "8", 8),
]  # fmt: skip
# Round 2 (dynamic sampling's second round): group 2 all right (zero variance), two truncated.
ROUND2 = [_record(2, 0, "4", 12, "length"), _record(2, 1, "4", 14), _record(2, 2, "4", 16, "length"),
          _record(2, 3, "4", 18)]  # fmt: skip
CONFIG = ScoreConfig(rewards="correct=2.0")


def test_one_round_metrics_are_the_hand_counts():
    _, summary = score_records(ROUND1, CONFIG)
    row = summary_metrics(summary)
    assert row["accuracy"] == 3 / 8
    assert row["reward/correct"] == 3 / 8 and row["reward"] == 2 * 3 / 8  # the weight applies to the total
    assert row["reward_std"] == pytest.approx(np.std([2, 2, 2, 0, 0, 0, 0, 0]))
    assert row["truncation_rate"] == 1 / 8
    assert row["frac_reward_zero_std"] == 1 / 2
    assert row["completion_len"] == (10 + 20 + 30 + 40 + 4 * 8) / 8
    assert row["completion_len_correct"] == 20 and row["completion_len_incorrect"] == (40 + 4 * 8) / 5
    assert row["reward_errors"] == 0


def test_dynamic_sampling_rounds_merge_into_the_union_of_their_records():
    summaries = [score_records(ROUND1, CONFIG)[1], score_records(ROUND2, CONFIG)[1]]
    row = summary_metrics(merge_summaries(summaries))
    rewards = np.array([2, 2, 2, 0, 0, 0, 0, 0, 2, 2, 2, 2], float)
    lengths = np.array([10, 20, 30, 40, 8, 8, 8, 8, 12, 14, 16, 18], float)
    right = rewards > 0
    assert row["accuracy"] == pytest.approx(7 / 12)
    assert row["reward"] == pytest.approx(rewards.mean()) and row["reward/correct"] == pytest.approx(7 / 12)
    assert row["reward_std"] == pytest.approx(rewards.std())  # pooled, not a mean of the rounds' spreads
    assert row["truncation_rate"] == pytest.approx(3 / 12)
    assert row["frac_reward_zero_std"] == pytest.approx(2 / 3)  # groups 1 and 2 of 3
    assert row["completion_len"] == pytest.approx(lengths.mean())
    assert row["completion_len_correct"] == pytest.approx(lengths[right].mean())
    assert row["completion_len_incorrect"] == pytest.approx(lengths[~right].mean())
    # the same as scoring the union in one go
    union = summary_metrics(score_records(ROUND1 + ROUND2, CONFIG)[1])
    for key in ("accuracy", "reward", "reward_std", "truncation_rate", "frac_reward_zero_std", "completion_len",
                "completion_len_correct", "completion_len_incorrect"):  # fmt: skip
        assert row[key] == pytest.approx(union[key]), key


def test_a_round_without_correct_answers_leaves_the_correct_length_to_the_others():
    wrong = [_record(5, i, "9", 50) for i in range(4)]
    row = summary_metrics(
        merge_summaries([score_records(ROUND1, CONFIG)[1], score_records(wrong, CONFIG)[1]])
    )
    assert row["completion_len_correct"] == pytest.approx(20)
    assert row["completion_len_incorrect"] == pytest.approx((40 + 4 * 8 + 4 * 50) / 9)


def test_the_step_aggregates_its_updates():
    def update(**kw):
        base = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "entropy": 1.0, "clip_low": 0.0, "clip_high": 0.0,
                "ratio_mean": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "grad_norm": 1.0, "lr": 1e-3,
                "logp_mismatch_mean": 0.0, "logp_mismatch_max": 0.0, "tokens": 10.0}  # fmt: skip
        return {**base, **kw}

    history = [
        update(loss=0.5, kl=0.01, clip_low=0.1, clip_high=0.0, ratio_min=0.7, ratio_max=1.2, grad_norm=2.0,
               logp_mismatch_mean=2e-6, logp_mismatch_max=5e-6, lr=1e-3),
        update(loss=-0.1, kl=0.03, clip_low=0.0, clip_high=0.3, ratio_min=0.9, ratio_max=1.6, grad_norm=4.0,
               logp_mismatch_mean=4e-6, logp_mismatch_max=3e-6, lr=5e-4),
    ]  # fmt: skip
    row = update_metrics(history)
    assert row["loss"] == pytest.approx(0.2) and row["kl"] == pytest.approx(0.02)
    assert row["clip_low"] == pytest.approx(0.05) and row["clip_high"] == pytest.approx(0.15)
    assert row["clip_frac"] == pytest.approx(0.2)
    assert (row["ratio_min"], row["ratio_max"]) == (0.7, 1.6)
    assert row["grad_norm"] == pytest.approx(3.0) and row["lr"] == 5e-4  # the last update's rate
    assert row["logp_mismatch_mean"] == pytest.approx(3e-6) and row["logp_mismatch_max"] == 5e-6
    assert "router_aux" not in row  # only a mixture of experts reports it
