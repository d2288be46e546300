"""`mllmjax rollout`: records per docs/design.md, log-probs against HF, determinism, the score pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_models import save_hf_model
from typer.testing import CliRunner

from mllmjax.convert import convert
from mllmjax.records import SCHEMA, read_records
from mllmjax_cli.main import app

runner = CliRunner()
ARGS = ["--data", "builtin:sums", "--num-prompts", "3", "-G", "4", "--max-new-tokens", "6", "--top-k", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rollout")
    model = save_hf_model("qwen2", folder / "hf", seed=3)
    convert(str(folder / "hf"), folder / "ckpt")
    return folder / "ckpt", model


def rollout(ckpt, out, *extra):
    return runner.invoke(app, ["rollout", str(ckpt), *ARGS, "-o", str(out), *extra])


def test_records_match_the_schema_and_hf_logprobs(tiny, tmp_path):
    ckpt, model = tiny
    result = rollout(ckpt, tmp_path / "r.jsonl", "--temperature", "0.7")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 12
    raw = json.loads(lines[0])
    assert raw["schema"] == SCHEMA
    assert set(raw) >= {"prompt_id", "group", "sample", "prompt", "prompt_ids", "completion", "completion_ids",
                        "logprobs", "finish_reason", "answer", "policy", "meta"}  # fmt: skip
    records = read_records(tmp_path / "r.jsonl")
    assert [(r.group, r.sample) for r in records] == [(g, s) for g in range(3) for s in range(4)]
    for r in records:
        assert len(r.logprobs) == len(r.completion_ids) >= 1
        assert r.finish_reason in ("stop", "length")
        assert r.policy.endswith("@0") and r.answer.lstrip("-").isdigit()
        # the sampled tokens' log-probs are log softmax(logits / T) of the policy: check against HF
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(r.prompt_ids) - 1 : -1] / 0.7
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        np.testing.assert_allclose(r.logprobs, ref.numpy(), atol=1e-4)
    groups = {r.group: r.prompt_ids for r in records}
    assert all(r.prompt_ids == groups[r.group] for r in records)


def test_deterministic_for_a_seed(tiny, tmp_path):
    ckpt, _ = tiny
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert rollout(ckpt, tmp_path / f"{name}.jsonl", "--seed", seed).exit_code == 0
    a, b, c = ((tmp_path / f"{n}.jsonl").read_text() for n in "abc")
    assert a == b and a != c


def test_pipes_into_score(tiny, tmp_path):
    ckpt, _ = tiny
    produced = rollout(ckpt, "-")
    assert produced.exit_code == 0
    jsonl = "".join(line + "\n" for line in produced.stdout.splitlines() if line.startswith("{"))
    scored = runner.invoke(app, ["score", "-", "-o", str(tmp_path / "s.jsonl")], input=jsonl)
    assert scored.exit_code == 0, scored.output
    assert all(r.advantage is not None for r in read_records(tmp_path / "s.jsonl"))


def test_bad_input(tiny, tmp_path):
    ckpt, _ = tiny
    (tmp_path / "r.jsonl").write_text("mine")
    for args, fragment in (
        (["rollout", str(tmp_path), *ARGS, "-o", str(tmp_path / "x.jsonl")], "not an mllmjax checkpoint"),
        (["rollout", str(ckpt), *ARGS, "-o", str(tmp_path / "r.jsonl")], "--force"),
        (["rollout", str(ckpt), "--data", "nope:task", "-o", str(tmp_path / "y.jsonl")], "--data"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and fragment in result.output, result.output
    assert (tmp_path / "r.jsonl").read_text() == "mine" and not (tmp_path / "x.jsonl").exists()
