"""Rewards: extraction precedence, math-verify comparison, strict format, tags, errors, and the GSM8K bar
(gold solutions rewritten as completions score correct; the same with a wrong final answer score 0)."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
from shared_data import SHARED, require_shared

from mllmjax.errors import BadInputError, RuntimeFailure
from mllmjax.records import RolloutRecord
from mllmjax.rewards import (
    REWARDS,
    correct_reward,
    evaluate_rewards,
    extract_prediction,
    format_reward,
    parse_reward_weights,
    register_reward,
    resolve_rewards,
    tags_reward,
)
from mllmjax.scoring import ScoreConfig, score_records

GSM8K_TEST = SHARED / "data" / "gsm8k" / "test.jsonl"


def exploding_reward(completion: str, answer: str, record: dict) -> float:
    raise RuntimeError(f"boom on {record['prompt_id']}")


def endless_reward(completion: str, answer: str, record: dict) -> float:
    if completion.endswith("5</answer>"):
        return 0.25
    while True:  # never returns on the others
        pass


def stubborn_reward(completion: str, answer: str, record: dict) -> float:
    try:
        time.sleep(3600)
    except Exception:  # a reward that catches everything must still be stopped
        return 9.0
    return 9.0


def dying_reward(completion: str, answer: str, record: dict) -> float:
    os._exit(3)  # a worker killed mid-task (OOM, segfault): the run must fail, not hang


def length_reward(completion: str, answer: str, record: dict) -> float:
    return -0.001 * len(record["completion_ids"])


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>so 17 or 18</think>\n<answer>18</answer>", "18"),
        ("<answer>3</answer> then <answer> 18 </answer> and 99", "18"),  # the last closed block
        ("I think \\boxed{\\frac{1}{2}} not 7", "\\frac{1}{2}"),
        ("\\boxed{a{b}c} and \\boxed{x^{2}}", "x^{2}"),  # the last boxed, braces balanced
        ("<answer>42</answer> but \\boxed{7}", "42"),  # answer tag beats boxed
        ("it costs -5.", "-5"),
        ("(-3)", "-3"),
        ("12-5", "5"),  # a minus after a digit is subtraction, not a sign
        ("a total of 1,234,567.25 dollars.", "1,234,567.25"),
        ("version 3.14 then 2", "2"),
        ("the sides are 3,4,5", "5"),  # a list, not thousands separators
        ("<answer>unclosed 18", "18"),  # no closed tag: fall through to the last number
        ("no numbers here", None),
    ],
)
def test_extraction_precedence(completion, expected):
    assert extract_prediction(completion) == expected


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("<answer>18</answer>", "18", 1.0),
        ("<answer>$18.00</answer>", "18", 1.0),
        ("<answer>1,000</answer>", "1000", 1.0),
        ("<answer>-7</answer>", "-7", 1.0),
        ("<answer>7</answer>", "-7", 0.0),
        ("<answer>2.5</answer>", "2.5", 1.0),
        ("<answer>\\frac{5}{2}</answer>", "2.5", 1.0),
        ("<think>The answer is 18</think>\n<answer>17</answer>", "18", 0.0),
        ("blah \\boxed{18} blah 3", "18", 1.0),
        ("so she makes 1,018 dollars", "1018", 1.0),
        ("nothing", "18", 0.0),
        ("<answer></answer>", "18", 0.0),
    ],
)
def test_correct(completion, gold, expected):
    assert correct_reward(completion, gold, {}) == expected


def test_correct_unparseable_gold_is_an_error_not_zero():
    outcome = evaluate_rewards(resolve_rewards((("correct", 1.0),)), "<answer>1</answer>", "", {})
    assert outcome.values == {"correct": 0.0}
    assert "does not parse" in outcome.errors["correct"]


def test_correct_off_the_main_thread_is_recorded_not_silent():
    got = {}
    thread = threading.Thread(
        target=lambda: got.update(
            o=evaluate_rewards(resolve_rewards((("correct", 1.0),)), "<answer>4</answer>", "4", {})
        )
    )
    thread.start()
    thread.join()
    assert got["o"].values["correct"] == 0.0
    assert "main thread" in got["o"].errors["correct"]


def test_correct_time_limit_is_enforced_and_recorded(monkeypatch):
    """A parse that outruns the limit is cut off (its sleep never finishes), scores 0 and is listed as
    an error. How long the cut-off takes is a benchmark's concern (scripts/bench_score.py), not a test's."""
    import math_verify.parser

    from mllmjax import rewards

    real = math_verify.parser.extract_target_from_pred
    finished = []

    def slow(pred, *args, **kwargs):
        if pred == "1234567":
            time.sleep(3)
            finished.append(pred)
        return real(pred, *args, **kwargs)

    monkeypatch.setattr(math_verify.parser, "extract_target_from_pred", slow)
    monkeypatch.setattr(rewards, "_correct_timeout_s", 1)
    outcome = evaluate_rewards(resolve_rewards((("correct", 1.0),)), "<answer>1234567</answer>", "4", {})
    assert outcome.values == {"correct": 0.0}
    assert list(outcome.errors) == ["correct"] and outcome.errors["correct"].startswith("TimeoutException")
    assert finished == []  # interrupted at the limit, not flagged after the slow call returned
    # Through scoring: the slow row scores 0 and is listed; its group's other row is scored as usual.
    records = [_record(0, 0, "<answer>1234567</answer>", "4"), _record(0, 1, "<answer>4</answer>", "4")]
    scored, summary = score_records(records, ScoreConfig(rewards="correct=1.0", correct_timeout_s=1))
    assert finished == []
    assert [r.rewards for r in scored] == [{"correct": 0.0}, {"correct": 1.0}]
    assert list(scored[0].reward_errors) == ["correct"]
    assert scored[0].reward_errors["correct"].startswith("TimeoutException")
    assert scored[1].reward_errors == {}
    assert summary["reward_errors"] == 1 and summary["reward_errors_by_name"] == {"correct": 1}


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>r</think>\n<answer>4</answer>", 1.0),
        ("<think>multi\nline</think>\n<answer>4\n</answer>", 1.0),
        ("<think>r</think>\n<answer>4</answer>\n", 0.0),  # trailing newline is trailing text
        ("<think>r</think>\n<answer>4</answer> ok", 0.0),
        ("<think>r</think>\n<answer>4</answer><answer>5</answer>", 0.0),
        (" <think>r</think>\n<answer>4</answer>", 0.0),
        ("<think>r</think><answer>4</answer>", 0.0),  # the newline is required
        ("<think>r</think>\n\n<answer>4</answer>", 0.0),
        ("<think> </think>\n<answer>4</answer>", 0.0),  # blank reasoning
        ("<think>r</think>\n<answer> </answer>", 0.0),  # blank answer
        ("<think>a<think>b</think>\n<answer>4</answer>", 0.0),
    ],
)
def test_format_is_strict(completion, expected):
    assert format_reward(completion, "4", {}) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>r</think>\n<answer>4</answer>", 1.0),
        ("<think>r</think>", 0.5),
        ("<think><think>r</think>\n<answer>4</answer>", 0.75),  # <think> twice
        ("<answer>4</answer><answer>5</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_tags_exactly_once(completion, expected):
    assert tags_reward(completion, "4", {}) == expected


def test_weight_specs():
    assert parse_reward_weights("correct=1.0,format=0.5,tags=0.5") == (
        ("correct", 1.0),
        ("format", 0.5),
        ("tags", 0.5),
    )
    assert parse_reward_weights("correct, test_rewards:length_reward=0.25") == (
        ("correct", 1.0),
        ("test_rewards:length_reward", 0.25),
    )
    with pytest.raises(BadInputError, match="not a number"):
        parse_reward_weights("correct=high")
    with pytest.raises(BadInputError, match="named twice"):
        parse_reward_weights("correct,correct=2")
    with pytest.raises(BadInputError, match="unknown reward 'corect'; known: correct, format, tags"):
        resolve_rewards(parse_reward_weights("corect=1"))
    with pytest.raises(BadInputError, match="cannot import"):
        resolve_rewards(parse_reward_weights("no_such_module_x:fn"))


def _record(group: int, sample: int, completion: str, answer: str, finish: str = "stop", n_tokens: int = 10):
    return RolloutRecord(
        prompt_id=group,
        group=group,
        sample=sample,
        prompt="q",
        prompt_ids=[1],
        completion=completion,
        completion_ids=[5] * n_tokens,
        logprobs=[-1.0] * n_tokens,
        finish_reason=finish,
        answer=answer,
        policy="p",
    )


def test_raising_custom_reward_scores_zero_and_is_recorded():
    records = [_record(0, 0, "<answer>4</answer>", "4"), _record(0, 1, "<answer>5</answer>", "4")]
    config = ScoreConfig(rewards="correct=1.0", reward_fns=("test_rewards:exploding_reward=0.5",))
    scored, summary = score_records(records, config)
    assert [r.rewards for r in scored] == [
        {"correct": 1.0, "exploding_reward": 0.0},
        {"correct": 0.0, "exploding_reward": 0.0},
    ]
    assert scored[0].reward_errors == {"exploding_reward": "RuntimeError: boom on 0"}
    assert [r.reward for r in scored] == [1.0, 0.0]
    assert summary["reward_errors"] == 2
    assert summary["reward_errors_by_name"] == {"exploding_reward": 2}


@pytest.mark.parametrize("value", [1e308, -1e10, float("nan"), float("inf"), True, "1"])
def test_a_reward_out_of_range_scores_zero_and_is_recorded(value):
    """Values the summary cannot average (1e308 overflowed its mean to inf) count as reward errors."""
    register_reward("test_bad_value", lambda completion, answer, record: value)
    try:
        records = [_record(0, 0, "<answer>4</answer>", "4"), _record(0, 1, "<answer>5</answer>", "4")]
        scored, summary = score_records(records, ScoreConfig(rewards="correct=1,test_bad_value=1"))
        assert [r.reward for r in scored] == [1.0, 0.0] and summary["reward"]["mean"] == 0.5
        assert all(r.reward_errors["test_bad_value"].startswith("TypeError: returned") for r in scored)
        assert summary["reward_errors"] == 2
    finally:
        REWARDS.pop("test_bad_value")
    register_reward("test_big_value", lambda completion, answer, record: -1e9)  # the bound itself is fine
    try:
        assert evaluate_rewards(resolve_rewards((("test_big_value", 1.0),)), "", "", {}).values == {
            "test_big_value": -1e9
        }
    finally:
        REWARDS.pop("test_big_value")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_reward_that_never_returns_is_cut_at_its_time_limit(workers):
    records = [_record(0, 0, "<answer>4</answer>", "4"), _record(0, 1, "<answer>5</answer>", "4"),
               _record(1, 0, "<answer>4</answer>", "4"), _record(1, 1, "<answer>4</answer>", "4")]  # fmt: skip
    config = ScoreConfig(
        rewards="correct=1",
        reward_fns=("test_rewards:endless_reward=1", "test_rewards:stubborn_reward=1"),
        reward_timeout_s=0.2,
        workers=workers,
    )
    scored, summary = score_records(records, config)
    assert [r.rewards["endless_reward"] for r in scored] == [0.0, 0.25, 0.0, 0.0]
    assert [r.rewards["stubborn_reward"] for r in scored] == [0.0] * 4
    assert [r.rewards["correct"] for r in scored] == [1.0, 0.0, 1.0, 1.0]  # the others still score
    limit = "RewardTimeout: ran past the 0.2 s limit (--reward-timeout)"
    assert [r.reward_errors.get("endless_reward") for r in scored] == [limit, None, limit, limit]
    assert all(r.reward_errors["stubborn_reward"] == limit for r in scored)
    assert summary["reward_errors_by_name"] == {"endless_reward": 3, "stubborn_reward": 4}


def test_reward_timeout_is_range_checked():
    for bad in (0, -1.0, float("nan"), "5"):
        with pytest.raises(BadInputError, match="--reward-timeout"):
            ScoreConfig(reward_timeout_s=bad)


def test_registered_reward_by_name_gets_the_record():
    register_reward("test_length", length_reward)
    try:
        records = [_record(0, 0, "x", "4", n_tokens=10), _record(0, 1, "y", "4", n_tokens=30)]
        scored, _ = score_records(records, ScoreConfig(rewards="test_length=2"))
        assert [r.reward for r in scored] == [pytest.approx(-0.02), pytest.approx(-0.06)]
        # dr_grpo: r - mean = +-0.02
        scored, _ = score_records(records, ScoreConfig(rewards="test_length=2", advantage="dr_grpo"))
        assert [r.advantage for r in scored] == [pytest.approx(0.02), pytest.approx(-0.02)]
    finally:
        REWARDS.pop("test_length")


def test_overlong_mask_and_penalty():
    records = [
        _record(0, 0, "<answer>4</answer>", "4"),
        _record(0, 1, "<answer>4", "4", finish="length"),
        _record(0, 2, "<answer>3</answer>", "4"),
        _record(0, 3, "<answer>3</answer>", "4"),
    ]
    plain, summary = score_records(records, ScoreConfig(rewards="correct", advantage="dr_grpo"))
    # "<answer>4" has no closed tag, so the last number 4 counts as the prediction
    assert [r.reward for r in plain] == [1.0, 1.0, 0.0, 0.0]
    assert summary["truncation_rate"] == 0.25
    masked, _ = score_records(records, ScoreConfig(rewards="correct", advantage="dr_grpo", overlong="mask"))
    assert [r.advantage for r in masked] == [0.5, 0.0, -0.5, -0.5]
    penalised, _ = score_records(
        records, ScoreConfig(rewards="correct", advantage="dr_grpo", overlong="penalty", overlong_penalty=1.0)
    )
    assert [r.reward for r in penalised] == [1.0, 0.0, 0.0, 0.0]
    assert penalised[1].rewards == {"correct": 1.0, "overlong": -1.0}
    assert [r.advantage for r in penalised] == [0.75, -0.25, -0.25, -0.25]


def test_zero_variance_counted_and_filtered():
    records = [
        _record(0, 0, "<answer>4</answer>", "4"),
        _record(0, 1, "<answer>3</answer>", "4"),
        _record(1, 0, "<answer>4</answer>", "4"),
        _record(1, 1, "<answer>4</answer>", "4"),
    ]
    kept, summary = score_records(records, ScoreConfig(rewards="correct"))
    assert len(kept) == 4 and summary["frac_reward_zero_std"] == 0.5
    kept, summary = score_records(records, ScoreConfig(rewards="correct", filter_zero_variance=True))
    assert [(r.group, r.sample) for r in kept] == [(0, 0), (0, 1)]
    assert summary["groups_dropped"] == 1 and summary["records_written"] == 2


def test_single_sample_groups_fail_before_scoring():
    with pytest.raises(BadInputError, match="G must be >= 2"):
        score_records([_record(0, 0, "x", "4"), _record(1, 0, "y", "4")], ScoreConfig())


# ---------------------------------------------------------------------------------------------- GSM8K

_FIXTURE = [
    {
        "question": "q1",
        "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18",
    },
    {
        "question": "q2",
        "answer": "80,000+50,000=$<<80000+50000=130000>>130,000\n200,000-130,000=$70,000\n#### 70,000",
    },
    {"question": "q3", "answer": "The temperature drops 5 - 8 = <<5-8=-3>>-3 degrees.\n#### -3"},
    {"question": "q4", "answer": "1,234 * 1,000 = 1,234,000 grains.\n#### 1,234,000"},
    {"question": "q5", "answer": "2 * 3.5 = <<2*3.5=7>>7\n#### 7"},
    {"question": "q6", "answer": "Half of 1 is 0.5, so 0.5 + 0 = 0.5 more.\n#### 0"},
]


def _wrong(final: str) -> str:
    """A different number in the same style (thousands separators kept)."""
    value = int(final.replace(",", "")) + 1
    return f"{value:,}" if "," in final else str(value)


def _check_gold_solutions_score(rows: list[dict]) -> None:
    """Each row's gold solution, as a completion, scores correct; the same with a wrong final answer
    scores 0 (the bar: 99.5% of rows each way); every one is well formatted, and nothing errs."""
    records = []
    for i, row in enumerate(rows):
        reasoning, final = (part.strip() for part in row["answer"].split("####"))
        gold = final.replace(",", "")
        assert re.fullmatch(r"-?\d+", gold), gold
        for sample, shown in enumerate((final, _wrong(final))):
            completion = f"<think>{reasoning}</think>\n<answer>{shown}</answer>"
            records.append(_record(i, sample, completion, gold))
    scored, summary = score_records(records, ScoreConfig())
    right = [r.rewards["correct"] for r in scored if r.sample == 0]
    wrong = [r.rewards["correct"] for r in scored if r.sample == 1]
    assert sum(v == 1.0 for v in right) >= 0.995 * len(rows)
    assert sum(v == 0.0 for v in wrong) >= 0.995 * len(rows)
    assert all(r.rewards["format"] == 1.0 and r.rewards["tags"] == 1.0 for r in scored)
    assert summary["reward_errors"] == 0


def test_gsm8k_gold_solutions_score_correct_and_wrong_answers_do_not():
    """The whole GSM8K test split (its speed: `python scripts/bench_score.py --budgets`)."""
    path = require_shared(GSM8K_TEST)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    _check_gold_solutions_score(rows)


def test_gsm8k_style_fixture_gold_solutions_score_correct_and_wrong_answers_do_not():
    """The same on hand-made rows in GSM8K's style (thousands separators, negatives, decimals in the
    working), which run wherever the shared data is absent too."""
    _check_gold_solutions_score(_FIXTURE)


def test_worker_processes_match_in_process_and_rescue_threads():
    records = [
        _record(g, s, f"<think>t</think>\n<answer>{g + s}</answer>", str(g))
        for g in range(6)
        for s in range(3)
    ]
    config = ScoreConfig(reward_fns=("test_rewards:length_reward",))
    in_process, _ = score_records(records, config)
    pooled, _ = score_records(records, ScoreConfig(reward_fns=("test_rewards:length_reward",), workers=2))
    assert pooled == in_process
    assert [r.rewards["correct"] for r in in_process[:3]] == [1.0, 0.0, 0.0]
    # off the main thread, workers=0 switches to a worker process so math-verify's alarm still works
    got = {}
    thread = threading.Thread(target=lambda: got.update(out=score_records(records, config)[0]))
    thread.start()
    thread.join()
    assert got["out"] == in_process


def test_a_dying_worker_fails_the_run_instead_of_hanging():
    records = [_record(0, s, "x", "4") for s in range(2)]
    with pytest.raises(RuntimeFailure, match="reward worker processes failed"):
        score_records(records, ScoreConfig(rewards="test_rewards:dying_reward", workers=1))
