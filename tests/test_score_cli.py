"""`mllmjax score` end to end through Typer's CliRunner: files, pipes, and one-line errors (exit 2,
nothing written)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mllmjax.records import RolloutRecord, read_records
from mllmjax_cli.main import app

runner = CliRunner()


def _record(group: int, sample: int, answer_shown: str, gold: str = "4", finish: str = "stop") -> dict:
    return RolloutRecord(
        prompt_id=f"q{group}",
        group=group,
        sample=sample,
        prompt=f"question {group}",
        prompt_ids=[1, 2, 3],
        completion=f"<think>two and two</think>\n<answer>{answer_shown}</answer>",
        completion_ids=[9] * (5 + sample),
        logprobs=[-0.1] * (5 + sample),
        finish_reason=finish,
        answer=gold,
        policy="ckpt@3",
    ).to_dict()


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


ROWS = [_record(0, 0, "4"), _record(0, 1, "5"), _record(1, 0, "4"), _record(1, 1, "4")]


def _one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_file_to_file_with_summary(tmp_path):
    src, dst = tmp_path / "r.jsonl", tmp_path / "s.jsonl"
    src.write_text(_jsonl(ROWS))
    result = runner.invoke(app, ["score", str(src), "-o", str(dst)])
    assert result.exit_code == 0, result.output
    scored = read_records(dst)
    assert [r.rewards["correct"] for r in scored] == [1.0, 0.0, 1.0, 1.0]
    assert [r.reward for r in scored] == [2.0, 1.0, 2.0, 2.0]  # 1*correct + 0.5*format + 0.5*tags
    s = 0.5 + 1e-4  # grpo: group 0 mean 1.5, std 0.5; group 1 all equal
    assert [r.advantage for r in scored] == [pytest.approx(0.5 / s), pytest.approx(-0.5 / s), 0.0, 0.0]
    assert "accuracy" in result.stderr and "frac_reward_zero_std" in result.stderr
    assert result.stdout == ""
    # an existing output needs --force, and is not touched without it
    before = dst.read_text()
    again = runner.invoke(app, ["score", str(src), "-o", str(dst), "--advantage", "rloo"])
    assert again.exit_code == 2 and "--force" in _one_line_error(again)
    assert dst.read_text() == before
    forced = runner.invoke(app, ["score", str(src), "-o", str(dst), "--advantage", "rloo", "--force"])
    assert forced.exit_code == 0
    assert [r.advantage for r in read_records(dst)] == [1.0, -1.0, 0.0, 0.0]


def test_pipe_stdin_to_stdout():
    result = runner.invoke(app, ["score", "-", "-o", "-", "--reward", "correct"], input=_jsonl(ROWS))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert first["schema"] == "mllmjax.rollout/1" and first["rewards"] == {"correct": 1.0}
    assert "score: <stdin>" in result.stderr  # the table goes to stderr, never into the records


def test_json_summary_and_filter(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text(_jsonl(ROWS))
    out = tmp_path / "s.jsonl"
    result = runner.invoke(app, ["score", str(src), "--filter-zero-variance", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["accuracy"] == 0.75
    assert summary["frac_reward_zero_std"] == 0.5
    assert summary["groups_dropped"] == 1 and summary["records_written"] == 2
    assert summary["rewards_mean"] == {"correct": 0.75, "format": 1.0, "tags": 1.0}
    assert [r.group for r in read_records(out)] == [0, 0]


def _bad(tmp_path, text: str, *extra: str):
    src, dst = tmp_path / "r.jsonl", tmp_path / "s.jsonl"
    src.write_text(text)
    result = runner.invoke(app, ["score", str(src), "-o", str(dst), *extra])
    assert result.exit_code == 2, result.output
    assert not dst.exists()
    assert result.stdout == ""
    return src, _one_line_error(result)


def test_malformed_json_line_names_file_and_line(tmp_path):
    src, message = _bad(tmp_path, _jsonl(ROWS[:2]) + "{not json\n" + _jsonl(ROWS[2:]))
    assert f"{src}:3: not valid JSON" in message


def test_wrong_schema_version(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[1]["schema"] = "mllmjax.rollout/3"  # /2 is /1 with images (test_vision_rollout.py)
    src, message = _bad(tmp_path, _jsonl(rows))
    want = "expected schema 'mllmjax.rollout/1' or 'mllmjax.rollout/2', got 'mllmjax.rollout/3'"
    assert f"{src}:2: {want}" in message
    rows[1]["schema"] = "mllmjax.rollout/2"  # a /2 record without its images
    src, message = _bad(tmp_path, _jsonl(rows))
    assert f"{src}:2: missing field(s) images (schema mllmjax.rollout/2)" in message


def test_missing_group_member(tmp_path):
    src, message = _bad(tmp_path, _jsonl([ROWS[0], ROWS[1], ROWS[3]]))
    assert f"{src}: group 1 is incomplete: 1 of 2 samples, missing sample(s) 0" in message


def test_unknown_reward_lists_known(tmp_path):
    _, message = _bad(tmp_path, _jsonl(ROWS), "--reward", "correct=1,brevity=0.2")
    assert "unknown reward 'brevity'; known: correct, format, tags" in message


def test_unknown_estimator_lists_known(tmp_path):
    _, message = _bad(tmp_path, _jsonl(ROWS), "--advantage", "ppo")
    assert "unknown advantage estimator 'ppo'; known: dr_grpo, grpo, grpo_clip2, reinforce, reinforce_pp, rloo" in message


def test_bad_reward_function_spec(tmp_path):
    _, message = _bad(tmp_path, _jsonl(ROWS), "--reward-fn", "nowhere_module_zz:fn")
    assert "cannot import 'nowhere_module_zz'" in message


def test_single_sample_groups(tmp_path):
    _, message = _bad(tmp_path, _jsonl([ROWS[0], ROWS[2]]))
    assert "G must be >= 2" in message


def test_real_shell_pipe_with_worker_processes(tmp_path):
    """A real process reading a pipe (`cat r.jsonl | mllmjax score - ...`), scoring in worker processes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "lib"), str(root)]))
    dst = tmp_path / "s.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "mllmjax_cli.main", "score", "-", "-o", str(dst), "--workers", "2"],
        input=_jsonl(ROWS),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r.rewards["correct"] for r in read_records(dst)] == [1.0, 0.0, 1.0, 1.0]
