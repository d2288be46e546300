"""`mllmjax eval`: the metric definitions on hand-made completions, and the command end to end."""

from __future__ import annotations

import json

import pytest
from hf_models import save_hf_model
from typer.testing import CliRunner

from mllmjax.convert import convert
from mllmjax.evaluation import summarize
from mllmjax.records import RolloutRecord
from mllmjax_cli.main import app


def rec(group: int, sample: int, completion: str, answer: str, finish: str = "stop") -> RolloutRecord:
    return RolloutRecord(
        prompt_id=f"p{group}", group=group, sample=sample, prompt="q", prompt_ids=[1], completion=completion,
        completion_ids=[1] * (sample + 1), logprobs=[-1.0] * (sample + 1), finish_reason=finish, answer=answer,
        policy="t",
    )  # fmt: skip


def test_metrics_by_hand():
    ok = "<think>\nx\n</think>\n<answer>{}</answer>"
    records = [
        # problem 0: 1 of 3 right; the majority (7, twice) is wrong
        rec(0, 0, ok.format(7), "5"), rec(0, 1, "so 7", "5"), rec(0, 2, ok.format(5), "5", "length"),
        # problem 1: majority 1,200 (as "1200" and "1,200") is right
        rec(1, 0, ok.format("1,200"), "1200"), rec(1, 1, "it is 1200", "1200"), rec(1, 2, "no idea", "1200"),
        # problem 2: nothing right, no predictions at all
        rec(2, 0, "hm", "3"), rec(2, 1, "hmm", "3"), rec(2, 2, "?", "3"),
    ]  # fmt: skip
    result, per = summarize(records)
    assert result.problems == 3 and result.k == 3
    assert result.pass_at_1 == pytest.approx(3 / 9)
    assert result.pass_at_k == pytest.approx(2 / 3)
    assert result.maj_at_k == pytest.approx(1 / 3)
    assert result.format_rate == pytest.approx(3 / 9)
    assert result.truncation_rate == pytest.approx(1 / 9)
    assert result.mean_tokens == pytest.approx(2.0)
    assert [p["correct"] for p in per[:3]] == [0.0, 0.0, 1.0]


def test_tie_goes_to_the_first_answer_seen():
    records = [rec(0, 0, "<answer>4</answer>", "4"), rec(0, 1, "<answer>9</answer>", "4")]
    assert summarize(records)[0].maj_at_k == 1.0
    records = [rec(0, 0, "<answer>9</answer>", "4"), rec(0, 1, "<answer>4</answer>", "4")]
    assert summarize(records)[0].maj_at_k == 0.0


def test_eval_command(tmp_path):
    save_hf_model("qwen3-tied", tmp_path / "hf")
    convert(str(tmp_path / "hf"), tmp_path / "ck")
    runner = CliRunner()
    args = [
        "eval",
        str(tmp_path / "ck"),
        "--data",
        "builtin:sums",
        "--num-prompts",
        "3",
        "--max-new-tokens",
        "4",
    ]
    result = runner.invoke(app, [*args, "--json", "-k", "2", "-o", str(tmp_path / "e.jsonl")])
    assert result.exit_code == 0, result.output
    numbers = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert numbers["problems"] == 3 and numbers["k"] == 2 and numbers["temperature"] == 1.0
    assert 0 <= numbers["pass_at_1"] <= numbers["pass_at_k"] <= 1
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 6
    greedy = runner.invoke(app, [*args, "--json"])
    assert (
        json.loads(next(ln for ln in greedy.stdout.splitlines() if ln.startswith("{")))["temperature"] == 0.0
    )
    bad = runner.invoke(app, [*args, "-k", "0"])
    assert bad.exit_code == 2 and "-k" in bad.output
