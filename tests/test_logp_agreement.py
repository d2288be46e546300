"""The trainer's log-probs against the sampler's and HF transformers', for every family.

The trainer recomputes the log-probs of sampled tokens (the PPO old log-probs, the ratio's denominator).
If it disagreed with the sampler (an off-by-one in `completion_start`, a dropped division by the
temperature, a wrong mask, a window applied in one and not the other) every trainer test would still
pass, since they compare the trainer with itself. Here: records sampled at temperature 0.7 and 1.3 from
left-padded prompts of different lengths; the trainer's per-token log-probs equal the records' within
1e-5 (float32) and HF's log_softmax(logits / T) within 1e-4 (the bound of the sampler-vs-HF tests); and
`mllmjax train` reports that gap as `logp_mismatch_max` / `logp_mismatch_mean`.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hf_models import save_hf_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mllmjax.checkpoint import load_checkpoint
from mllmjax.convert import convert
from mllmjax.loss import LossConfig
from mllmjax.records import RolloutRecord, write_records
from mllmjax.sampling.sampler import generate
from mllmjax.sampling.strategies import Sample
from mllmjax.trainer import TrainConfig, Trainer
from mllmjax.training import batch_from_records
from mllmjax_cli.main import app

FAMILIES = ["llama-tied", "qwen2", "qwen3", "gemma2", "gemma3", "qwen3-moe"]
PROMPT_LENGTHS = (3, 9, 14)  # left-padded to 32 columns: completions start at different positions
NEW_TOKENS = 10  # longer than the Gemma windows (5): the sliding layers' masks matter
runner = CliRunner()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(request.param, folder / "hf", seed=4)
    convert(str(folder / "hf"), folder / "ck")
    return folder / "ck", model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_hf_model("llama-tied", folder / "hf", seed=4)
    convert(str(folder / "hf"), folder / "ck")
    return folder / "ck"


def sampled_records(ckpt, temperature: float) -> list[RolloutRecord]:
    """Two samples of each prompt at `temperature`, from the full vocabulary (the trainer's distribution)."""
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 120, n).tolist() for n in PROMPT_LENGTHS]
    completions = generate(
        ckpt.params,
        ckpt.cfg,
        prompts,
        Sample(temperature=temperature),
        n=2,
        max_new_tokens=NEW_TOKENS,
        seed=2,
    )
    return [
        RolloutRecord(
            prompt_id=c.prompt_index,
            group=c.prompt_index,
            sample=c.sample_index,
            prompt=" ".join(f"w{t - 3}" for t in prompts[c.prompt_index]),  # the tiny tokenizer's words
            prompt_ids=prompts[c.prompt_index],
            completion="",
            completion_ids=list(c.ids),
            logprobs=list(c.logprobs),
            finish_reason=c.finish_reason,
            answer="",
            policy="test",
            rewards={"x": 0.0},
            reward=0.0,
            advantage=float(c.sample_index) - 0.5,
            reward_errors={},
        )
        for c in completions
    ]


def hf_logprobs(model, record: RolloutRecord, temperature: float) -> np.ndarray:
    ids = torch.tensor([record.prompt_ids + record.completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(record.prompt_ids) - 1 : -1].double() / temperature
    picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(record.completion_ids)[:, None])[:, 0]
    return picked.numpy()


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_trainer_logprobs_equal_the_samplers_and_hf(family, temperature):
    path, model = family
    ckpt = load_checkpoint(path)
    records = sampled_records(ckpt, temperature)
    assert all(len(r.completion_ids) == NEW_TOKENS for r in records)  # no stop ids: full length
    batch = batch_from_records(records)
    assert batch.completion_start == 32 and len({len(r.prompt_ids) for r in records}) == 3
    trainer = Trainer(ckpt.cfg, TrainConfig(temperature=temperature, loss=LossConfig(beta=0.0)))
    ours = np.asarray(trainer.logprobs(ckpt.params, batch))
    start = batch.completion_start
    for i, r in enumerate(records):
        row = ours[i, start : start + NEW_TOKENS]
        np.testing.assert_allclose(row, r.logprobs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(row, hf_logprobs(model, r, temperature), rtol=0, atol=1e-4)
        assert not ours[i, :start].any()  # the prompt's positions are never scored
        # The temperature matters at this size: HF's log-probs at T=1 are far from these.
        assert np.abs(row - hf_logprobs(model, r, 1.0)).max() > 1e-2


def test_train_reports_the_sampler_trainer_gap(llama, tmp_path):
    """`mllmjax train` logs |old - sampler| per update: ~0 on the sampler's own log-probs, and exactly the
    planted offset on log-probs shifted by +-0.25 (as a drifting, e.g. bfloat16, sampler would give)."""
    path = llama
    records = sampled_records(load_checkpoint(path), 0.7)
    shift = [[0.25 if (i + j) % 2 else -0.25 for j in range(NEW_TOKENS)] for i in range(len(records))]
    shifted = [
        dataclasses.replace(r, logprobs=[x + d for x, d in zip(r.logprobs, s, strict=True)])
        for r, s in zip(records, shift, strict=True)
    ]
    for name, rows in (("same", records), ("shifted", shifted)):
        write_records(rows, tmp_path / f"{name}.jsonl")
        args = ["train", str(path), str(tmp_path / f"{name}.jsonl"), "-o", str(tmp_path / name), "--temperature",
                "0.7", "--beta", "0", "--ppo-epochs", "2", "--lr", "1e-3"]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        updates = [json.loads(x) for x in (tmp_path / name / "train_metrics.jsonl").read_text().splitlines()]
        assert len(updates) == 2
        for m in updates:  # epoch 1's old log-probs are epoch 0's, from the same starting parameters
            if name == "same":
                assert m["logp_mismatch_max"] < 1e-5 and m["logp_mismatch_mean"] < 1e-5
            else:
                assert m["logp_mismatch_max"] == pytest.approx(0.25, abs=1e-5)
                assert m["logp_mismatch_mean"] == pytest.approx(0.25, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# truncated importance sampling through the commands


def _tis_loss(old: list[np.ndarray], sampler: list[np.ndarray], advantages: list[float], cap: float) -> float:
    """Numpy reference of the first update's loss (ratio 1, beta 0, token mean over the batch):
    -sum_b sum_t A_b * min(exp(old - sampler), cap) / N."""
    n = sum(len(o) for o in old)
    rows = zip(old, sampler, advantages, strict=True)
    return -sum(a * np.minimum(np.exp(o - s), cap).sum() for o, s, a in rows) / n


def test_train_weights_the_loss_by_truncated_importance_ratios(llama, tmp_path):
    """Records whose sampler log-probs are off by random amounts in [-0.4, 0.4]: `train --tis-cap 1.1`'s
    loss equals the numpy reference with HF's log-probs as the old ones, and differs from the plain loss."""
    path = llama
    hf = AutoModelForCausalLM.from_pretrained(path.parent / "hf", dtype=torch.float32).eval()  # the fixture's
    rng = np.random.default_rng(5)
    records = [
        dataclasses.replace(
            r,
            logprobs=(np.asarray(r.logprobs) + rng.uniform(-0.4, 0.4, NEW_TOKENS)).tolist(),
            advantage=float(rng.normal()),
        )
        for r in sampled_records(load_checkpoint(path), 0.7)
    ]
    write_records(records, tmp_path / "drift.jsonl")
    old = [hf_logprobs(hf, r, 0.7) for r in records]
    sampler = [np.asarray(r.logprobs, np.float64) for r in records]
    advantages = [r.advantage for r in records]
    losses = {}
    for name, extra in (("tis", ["--tis-cap", "1.1"]), ("plain", [])):
        args = ["train", str(path), str(tmp_path / "drift.jsonl"), "-o", str(tmp_path / name), "--temperature",
                "0.7", "--beta", "0", "--ppo-epochs", "1", *extra]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        (m,) = [json.loads(x) for x in (tmp_path / name / "train_metrics.jsonl").read_text().splitlines()]
        losses[name] = m["loss"]
        gaps = np.concatenate([np.abs(o - s) for o, s in zip(old, sampler, strict=True)])
        assert m["logp_mismatch_max"] == pytest.approx(gaps.max(), abs=1e-4)
        assert m["logp_mismatch_mean"] == pytest.approx(gaps.mean(), abs=1e-4)
    want = _tis_loss(old, sampler, advantages, 1.1)
    plain = -sum(a * len(o) for a, o in zip(advantages, old, strict=True)) / sum(len(o) for o in old)
    assert losses["tis"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert losses["plain"] == pytest.approx(plain, rel=1e-5, abs=1e-7)
    assert abs(want - plain) > 100 * 1e-4 * abs(want)  # the weights change the loss well beyond the tolerance


def test_grpo_passes_the_samplers_logprobs_to_truncated_importance_sampling(llama, tmp_path):
    """Two one-step grpo runs on the same seed sample the same records; with `--tis-cap 0.5` every token's
    weight min(pi_old / pi_sampler, 0.5) is 0.5 (the two agree in float32), so the loss and the gradient
    norm are half the plain run's, and the loss equals the numpy reference on the saved records."""
    args = ["grpo", "--model", str(llama), "--data", "builtin:sums", "-G", "4", "--prompts-per-step", "2",
            "--max-new-tokens", "8", "--reward", "correct=1.0", "--reward-fn", "grpo_rewards:even=1",
            "--beta", "0", "--ppo-epochs", "1", "--steps", "1", "--seed", "3", "--save-rollouts"]  # fmt: skip
    rows = {}
    for name, extra in (("plain", []), ("tis", ["--tis-cap", "0.5"])):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        (rows[name],) = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert rows[name]["logp_mismatch_max"] < 1e-5
    saved = {}
    for name in rows:  # the records but their policy field, which names the run directory
        lines = (tmp_path / name / "rollouts" / "step_1.jsonl").read_text().splitlines()
        saved[name] = [{k: v for k, v in json.loads(x).items() if k != "policy"} for x in lines]
    assert saved["plain"] == saved["tis"]
    records = saved["tis"]
    logps = [np.asarray(r["logprobs"], np.float64) for r in records]
    want = _tis_loss(logps, logps, [r["advantage"] for r in records], 0.5)
    assert rows["tis"]["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert rows["tis"]["loss"] == pytest.approx(0.5 * rows["plain"]["loss"], rel=1e-5, abs=1e-7)
    assert rows["tis"]["grad_norm"] == pytest.approx(0.5 * rows["plain"]["grad_norm"], rel=1e-5)
    assert abs(rows["plain"]["loss"]) > 1e-4
