"""`mllmjax grpo`: the run directory and its artifacts, config files and recipes, dynamic sampling,
exact resume after kill -9 at several points, Ctrl-C, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hf_models import save_hf_model
from typer.testing import CliRunner
from xla_flags import xla_flags

from mllmjax.checkpoint import load_checkpoint, read_meta
from mllmjax.convert import convert
from mllmjax.grpo import (
    GRPOConfig,
    build_config,
    checkpoint_steps,
    eta_seconds,
    read_config_file,
    read_metrics,
    steady_step_seconds,
    terms_off,
)
from mllmjax.grpo.loop import is_embedded_default
from mllmjax.grpo.stages import no_signal_advice
from mllmjax_cli.main import app

runner = CliRunner()
TESTS = Path(__file__).parent
ROOT = TESTS.parent

# A 3-step run on a tiny random model: 2 prompts x G=4 per step, 8 new tokens, a reward with signal.
TINY = ["--data", "builtin:sums", "-G", "4", "--prompts-per-step", "2", "--max-new-tokens", "8",
        "--reward", "correct=1.0", "--reward-fn", "grpo_rewards:even=1", "--lr", "1e-3", "--beta", "0.04",
        "--optimizer", "adamw", "--seed", "3"]  # fmt: skip

STEP_KEYS = {
    "step", "reward", "reward/correct", "reward/even", "reward_std", "accuracy", "kl", "entropy", "clip_frac",
    "clip_low", "clip_high", "ratio_mean", "ratio_min", "ratio_max", "grad_norm", "lr", "loss", "policy_loss",
    "completion_len", "truncation_rate", "frac_reward_zero_std", "sampling_rounds", "prompts_sampled",
    "groups_trained", "rollout_s", "score_s", "train_s", "ref_logps_s", "step_s", "rollout_tok_s",
    "train_tok_s", "updates", "elapsed_s", "peak_rss_gb",
}  # fmt: skip
MACHINE_KEYS = {"peak_rss_gb"}  # measured of the process, like the times (keys ending in _s)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grpo")
    save_hf_model("llama-tied", folder / "hf", seed=2)
    convert(str(folder / "hf"), folder / "ck")
    return folder / "ck"


def _env() -> dict[str, str]:
    paths = [str(ROOT / "lib"), str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "XLA_FLAGS": xla_flags()}


def _grpo(args: list[str], crash: str | None = None, **kw) -> subprocess.CompletedProcess:
    env = _env()
    if crash:
        env["MLLMJAX_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "mllmjax_cli.main", "grpo", *args], env=env,
                          capture_output=True, text=True, timeout=600, **kw)  # fmt: skip


def _params(path: Path) -> dict[str, np.ndarray]:
    params = load_checkpoint(path).params
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _train_state(path: Path) -> dict[str, np.ndarray]:
    """A checkpoint's whole train state as arrays by name: params, and from opt_state/ the optimizer
    state (moments, optax's update count), the update count and the RNG."""
    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().restore((path / "opt_state").absolute())
    leaves = jax.tree_util.tree_leaves_with_path(saved)
    return {**_params(path), **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}}


def test_three_steps_write_every_artifact(ckpt, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    run = tmp_path / "run"
    args = ["grpo", "--model", str(ckpt), *TINY, "--steps", "3", "--eval-every", "2", "--eval-num-prompts", "3",
            "--save-every", "2", "--keep", "1", "--save-rollouts", "-o", str(run), "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "done" and summary["step"] == 3
    # The process's peak resident memory (this pytest process), against the kernel's high-water mark.
    hwm = Path("/proc/self/status")
    if hwm.exists():
        kib = next(int(line.split()[1]) for line in hwm.read_text().splitlines() if line.startswith("VmHWM:"))
        assert 0.9 * kib * 1024 / 1e9 <= summary["peak_rss_gb"] <= kib * 1024 / 1e9 + 0.001

    config = json.loads((run / "config.json").read_text())
    assert config["format"] == "mllmjax.grpo-run/1"
    assert (
        config["steps"] == 3 and config["group_size"] == 4 and config["reward_fn"] == ["grpo_rewards:even=1"]
    )
    assert config["start_checkpoint"] == str(ckpt)

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # step 0: the evaluation before training
    for row in rows[1:]:
        assert set(row) >= STEP_KEYS, STEP_KEYS - set(row)
        assert all(np.isfinite(v) for v in row.values() if isinstance(v, float))
        assert row["groups_trained"] == 2 and row["sampling_rounds"] == 1
    assert [r["updates"] for r in rows[1:]] == [2, 4, 6]  # 2 PPO epochs x 1 minibatch per step
    peaks = [r["peak_rss_gb"] for r in rows[1:]]  # a running peak: never falls
    assert peaks == sorted(peaks) and peaks[-1] <= summary["peak_rss_gb"]
    assert {r["step"] for r in rows if "eval/accuracy" in r} == {0, 2, 3}
    # Held-out before the first step and after the last: in the summary and the closing lines.
    held = {name: {"step": rows[i]["step"], "accuracy": rows[i]["eval/accuracy"], "format": rows[i]["eval/format"]}
            for name, i in (("before", 0), ("after", 3))}  # fmt: skip
    assert summary["held_out"] == held
    line = (
        f"held-out accuracy {held['before']['accuracy']:.0%} -> {held['after']['accuracy']:.0%}, "
        f"format {held['before']['format']:.0%} -> {held['after']['format']:.0%}"
    )
    assert line in result.stderr
    assert rows[3]["kl"] > 0  # beta > 0: the policy moved away from the reference and KL is measured
    # Rewards and advantages are the `score` stage's: the saved records carry them.
    saved = sorted(p.name for p in (run / "rollouts").iterdir())
    assert saved == ["step_1.jsonl", "step_2.jsonl", "step_3.jsonl"]
    recs = [json.loads(x) for x in (run / "rollouts" / "step_3.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and {"rewards", "advantage", "reward"} <= set(recs[0])
    assert np.mean([r["reward"] for r in recs]) == pytest.approx(rows[3]["reward"])

    assert checkpoint_steps(run) == [3]  # keep 1: step_2 was removed after step_3 was written
    meta = read_meta(run / "checkpoints" / "step_3")
    assert meta["step"] == 3 and meta["updates"] == 6 and meta["grpo"]["cursor"] == 6
    assert (run / "checkpoints" / "step_3" / "opt_state").is_dir()
    assert (run / "checkpoints" / "step_3" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(
        f"{n}.png" for n in ("reward", "accuracy", "kl", "entropy", "length")
    )
    # The run's checkpoint is an ordinary checkpoint: other commands read it.
    out = runner.invoke(
        app, ["sample", str(run / "checkpoints" / "step_3"), "w1 w2", "--max-new-tokens", "3"]
    )
    assert out.exit_code == 0, out.output


def test_report_to_tensorboard_logs_every_metric_of_every_step(ckpt, tmp_path, monkeypatch):
    """--report-to tensorboard: the event files, read back with TensorBoard's own reader, hold every
    numeric metric of metrics.jsonl at its step (float32, as TensorBoard stores scalars), and nothing else."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.syspath_prepend(str(TESTS))
    run = tmp_path / "run"
    args = ["grpo", "--model", str(ckpt), *TINY, "--steps", "2", "--eval-every", "2", "--eval-num-prompts", "2",
            "--report-to", "tensorboard", "-o", str(run)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    expected = {
        (k, r["step"]): float(np.float32(v))
        for r in rows
        for k, v in r.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged: dict[tuple[str, int], float] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert (tag, event.step) not in logged, (tag, event.step)  # each value written once
            logged[(tag, event.step)] = event.value
    assert {"reward", "loss", "kl", "grad_norm", "lr", "eval/accuracy"} <= {k for k, _ in logged}
    assert logged == expected


def test_the_reward_rises_on_a_task_the_model_can_learn(ckpt, tmp_path, monkeypatch):
    """GRPO learns: rewarded for a first token whose id is 5 mod 8 (one id in eight), a tiny random
    model goes from about 1 in 8 to nearly always in 6 steps (one token per completion, a high LR).
    A sign error anywhere between the rewards and the update (advantages, loss, optimizer) makes the
    reward fall instead."""
    monkeypatch.syspath_prepend(str(TESTS))
    run = tmp_path / "run"
    args = ["grpo", "--model", str(ckpt), "--data", "builtin:sums", "--reward", "correct=0",
            "--reward-fn", "grpo_rewards:starts_5_mod_8=1", "-G", "16", "--prompts-per-step", "2",
            "--max-new-tokens", "1", "--beta", "0", "--ppo-epochs", "2", "--optimizer", "adamw", "--lr", "5e-2",
            "--steps", "6", "--seed", "0", "-o", str(run)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rewards = [r["reward"] for r in read_metrics(run)]
    assert len(rewards) == 6
    # Seeds 0-4 measured: first step 0.06-0.16, last two steps 0.94-1.00.
    assert rewards[0] < 0.3 and np.mean(rewards[-2:]) > 0.8, rewards


def test_config_file_and_flags(ckpt, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        f"model: {ckpt}\ndata: builtin:sums\nsteps: 5\ngroup-size: 4\nprompts_per_step: 1\nmax-new-tokens: 6\n"
        "reward: correct=1.0\nreward-fn: [grpo_rewards:even=1]\nppo-epochs: 1\nlr: 0.001\n"
    )
    run = tmp_path / "run"
    result = runner.invoke(app, ["grpo", "--config", str(cfg_file), "--steps", "1", "-o", str(run)])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 1  # the flag wins over the file
    assert config["max_new_tokens"] == 6 and config["ppo_epochs"] == 1  # the file wins over the defaults
    assert config["beta"] == 0.04 and config["temperature"] == 1.0  # untouched defaults
    assert checkpoint_steps(run) == [1]

    bad = tmp_path / "bad.toml"
    bad.write_text('model = "x"\nmax-new-tokes = 5\n')
    result = runner.invoke(app, ["grpo", "--config", str(bad), "-o", str(tmp_path / "r2")])
    assert result.exit_code == 2 and "unknown setting 'max-new-tokes'" in result.output
    assert not (tmp_path / "r2").exists()


def test_recipes_and_the_embedded_default():
    default = build_config()  # no model, no data: the embedded default recipe
    assert default.model == "smollm2-135m" and default.data == "builtin:arith:level=0"
    assert default.max_new_tokens == 128 and default.reward == "correct=1.0,format=0.25" and default.dynamic_sampling
    # It evaluates held-out accuracy and format before the first step and after the last, and nowhere
    # between (a step-0 row, then eval at step % eval_every == 0 or the last step).
    assert default.eval_every == default.steps and default.eval_num_prompts == 64
    assert default.remat == "nothing_saveable"  # a third less peak memory, and a faster run, measured
    named = build_config({"data": "gsm8k"})  # data named: the GSM8K defaults of GRPOConfig
    assert named.model == "smollm2-135m" and named.group_size == 16 and named.max_new_tokens == 1024
    assert named.lr == 1e-6 and named.optimizer == "lion" and named.beta == 0.04 and named.ppo_epochs == 2
    qwen = build_config(read_config_file("gsm8k-qwen2.5-3b"))
    assert qwen.model == "Qwen/Qwen2.5-3B-Instruct" and qwen.data == "gsm8k" and qwen.steps == 400
    assert (qwen.group_size, qwen.prompts_per_step, qwen.temperature, qwen.top_k) == (16, 1, 1.0, 50)
    assert qwen.reward == "correct=1.0,format=0.5,tags=0.5"
    # Only a run on another model or data than the embedded default's is probed for signal.
    assert is_embedded_default(default) and not is_embedded_default(named)


def test_gsm8k_recipe_runs_on_a_gsm8k_file(ckpt, tmp_path, monkeypatch):
    """The real recipe's path: GSM8K-format records, its rewards and settings, cut to one short step."""
    monkeypatch.syspath_prepend(str(TESTS))
    data = tmp_path / "gsm8k"
    data.mkdir()
    rows = [{"question": f"w{i} w{i + 1} hi", "answer": f"w{i} plus w1\n#### {i + 1}"} for i in range(6)]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    args = ["grpo", "--config", "gsm8k-qwen2.5-3b", "--model", str(ckpt), "--data", str(data), "--steps", "1",
            "-G", "2", "--max-new-tokens", "6", "--eval-num-prompts", "2", "-o", str(run)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1] and "eval/accuracy" in rows[1]
    assert {"reward/correct", "reward/format", "reward/tags"} <= set(rows[1])


def test_the_probe_warns_before_the_first_step_when_no_group_has_signal(ckpt, tmp_path, monkeypatch):
    """A tiny random model never answers builtin:sums right, so with the correct reward alone no group's
    rewards differ: the run says so before its first step, with what to try. The probe consumes no data
    and changes nothing: the run equals one with --no-probe. With a reward that varies, it finds signal."""
    monkeypatch.syspath_prepend(str(TESTS))
    base = ["grpo", "--model", str(ckpt), "--data", "builtin:sums", "-G", "4", "--prompts-per-step", "2",
            "--max-new-tokens", "4", "--batch-size", "12", "--steps", "1", "--json"]  # fmt: skip
    runs = {"probed": ["--reward", "correct=1.0"], "unprobed": ["--reward", "correct=1.0", "--no-probe"],
            "signal": ["--reward", "correct=1.0", "--reward-fn", "grpo_rewards:even=1"]}  # fmt: skip
    out = {}
    for name, extra in runs.items():
        result = runner.invoke(app, [*base, *extra, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        out[name] = (json.loads(result.stdout.strip().splitlines()[-1]), " ".join(result.stderr.split()))
    summary, log = out["probed"]
    # --batch-size 12 holds 3 groups of 4: the probe samples the first 3 prompts of the data order.
    cut = summary["probe"].pop("truncation_rate")  # 4 new tokens: most completions are cut
    assert summary["probe"] == {"prompts": 3, "groups": 3, "groups_with_signal": 0, "reward_mean": 0.0,
                                "rewards_mean": {"correct": 0.0}}  # fmt: skip
    assert "warning: probe: 3 prompts x 4 completions of builtin:sums" in log
    assert "0 of 3 groups with differing rewards; mean reward 0.00 (correct 0.00)" in log
    assert cut >= 0.5 and f"{cut:.0%} of completions were cut at --max-new-tokens 4: raise it" in log
    assert "add a reward that gives early signal" in log and "--no-probe skips this check" in log
    assert log.index("warning: probe") < log.index("done: 1 steps")
    assert "probe" not in out["unprobed"][0] and "probe:" not in out["unprobed"][1]
    a, b = _params(tmp_path / "probed/checkpoints/step_1"), _params(tmp_path / "unprobed/checkpoints/step_1")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    (x,), (y,) = read_metrics(tmp_path / "probed"), read_metrics(tmp_path / "unprobed")
    assert {k: v for k, v in x.items() if not k.endswith("_s") and k not in MACHINE_KEYS} == {
        k: v for k, v in y.items() if not k.endswith("_s") and k not in MACHINE_KEYS
    }
    summary, log = out["signal"]
    assert summary["probe"]["groups_with_signal"] == 3 and summary["probe"]["reward_mean"] > 0
    assert "probe: 3 prompts x 4 completions" in log and "warning: probe" not in log
    assert "no completion was correct, so the signal is the other rewards' alone for now" in log
    # What the advice says when every completion is already right.
    cfg = build_config({"model": str(ckpt), "data": "builtin:sums"})
    assert no_signal_advice(cfg, {"rewards_mean": {"correct": 1.0}, "truncation_rate": 0.0}).startswith(
        "every completion is already correct"
    )


@pytest.mark.parametrize(
    "batch, prompts, rounds, sampled, trained",
    [
        # A decode batch of 1 group: round 0 samples the 2 wanted, groups 0, 1 (1 has no signal); round
        # 1 samples one more prompt, group 2, which has.
        (4, 2, 2, 3, [0, 2]),
        # A batch of 4 groups: one round of groups 0-3 holds the two with signal, 0 and 2.
        (16, 2, 1, 4, [0, 2]),
        # 3 wanted: round 0 (0-3) gives 0 and 2; round 1 still fills the batch (4-7) for the one left,
        # keeps 4 and drops 6, a surplus group with signal.
        (16, 3, 2, 8, [0, 2, 4]),
    ],
)
def test_dynamic_sampling_fills_the_batch_with_signal(ckpt, tmp_path, monkeypatch, batch, prompts, rounds,
                                                      sampled, trained):  # fmt: skip
    """Each round over-samples as many prompts as fill one --batch-size decode (DAPO), and the step
    trains on the first groups with signal in data order."""
    monkeypatch.syspath_prepend(str(TESTS))
    run = tmp_path / "run"
    args = ["grpo", "--model", str(ckpt), "--data", "builtin:sums", "-G", "4", "--prompts-per-step", str(prompts),
            "--max-new-tokens", "4", "--reward", "correct=0", "--reward-fn", "grpo_rewards:even_groups_only",
            "--dynamic-sampling", "--batch-size", str(batch), "--steps", "1", "--save-rollouts", "-o", str(run)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (row,) = read_metrics(run)
    counts = (row["sampling_rounds"], row["prompts_sampled"], row["groups_trained"])
    assert counts == (rounds, sampled, len(trained))
    recs = [json.loads(x) for x in (run / "rollouts" / "step_1.jsonl").read_text().splitlines()]
    assert sorted({r["group"] for r in recs}) == trained
    assert read_meta(run / "checkpoints" / "step_1")["grpo"]["cursor"] == sampled


def test_resume_after_kill_equals_an_uninterrupted_run(ckpt, tmp_path):
    """kill -9 at four points (after sampling, mid-update, mid-checkpoint-write, between metrics and
    checkpoint), resume each time: the final train state (params, optimizer state, update count, RNG)
    and every metric but the times equal an uninterrupted run's bit for bit, and a torn checkpoint is
    never picked up. Two minibatches per epoch: the restored RNG decides which rows each update sees."""
    base = ["--model", str(ckpt), *TINY, "--minibatches", "2", "--steps", "4", "--save-every", "1",
            "--keep", "2"]  # fmt: skip
    straight = tmp_path / "straight"
    done = _grpo([*base, "-o", str(straight)])
    assert done.returncode == 0, done.stderr

    run = tmp_path / "killed"
    first = _grpo([*base, "-o", str(run)], crash="rollout@2")
    assert first.returncode == -signal.SIGKILL
    assert checkpoint_steps(run) == [1]
    for crash, before in (("checkpoint@3", [1, 2]), ("update@4", [2, 3]), ("metrics@4", [2, 3])):
        proc = _grpo(["--resume", str(run)], crash=crash)
        assert proc.returncode == -signal.SIGKILL, (crash, proc.stderr)
        assert checkpoint_steps(run) == before, crash
        if crash.startswith("checkpoint"):  # the torn write is a hidden temp dir, never a step_N
            assert any(p.name.startswith(".step_3.tmp") for p in (run / "checkpoints").iterdir())
    last = _grpo(["--resume", str(run)])
    assert last.returncode == 0, last.stderr
    assert checkpoint_steps(run) == [3, 4]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]

    a, b = _train_state(straight / "checkpoints" / "step_4"), _train_state(run / "checkpoints" / "step_4")
    assert sorted(a) == sorted(b) and len(a) > len(_params(straight / "checkpoints" / "step_4"))
    for name in a:  # bitwise, as `train --resume` (the same programs on the same data in the same order)
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    ra, rb = read_metrics(straight), read_metrics(run)
    assert [r["step"] for r in rb] == [1, 2, 3, 4] and [r["updates"] for r in rb] == [4, 8, 12, 16]
    for x, y in zip(ra, rb, strict=True):  # every metric but the measurements of the process
        assert set(x) == set(y)
        same = {k: v for k, v in x.items() if not k.endswith("_s") and k not in MACHINE_KEYS}
        assert same == {k: y[k] for k in same}, x["step"]
    # The run's clock goes on across resumes: each step's elapsed_s exceeds the one before it.
    elapsed = [r["elapsed_s"] for r in rb]
    assert all(later > earlier for earlier, later in zip(elapsed[:-1], elapsed[1:], strict=True)), elapsed


def test_ctrl_c_finishes_the_step_and_prints_the_resume_command(ckpt, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mllmjax_cli.main", "grpo", "--model", str(ckpt), *TINY, "--steps", "50",
         "--save-every", "100", "-o", str(run)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not read_metrics(run):
        time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    steps = [r["step"] for r in read_metrics(run)]
    assert steps and checkpoint_steps(run) == [steps[-1]] and steps[-1] < 50
    assert f"mllmjax grpo --resume {run}" in " ".join(err.split())


def test_an_abandoned_step_rolls_back_to_the_state_it_started_from(ckpt, tmp_path, monkeypatch):
    """A KeyboardInterrupt after step 2's first update (which took over a state, donated to XLA) saves
    the same step-1 state as one before step 2 trained at all: the updates never consumed the state
    kept to roll the step back."""
    from mllmjax.grpo import faults

    monkeypatch.syspath_prepend(str(TESTS))

    def interrupted_at(point: tuple[str, int]) -> dict[str, np.ndarray]:
        def interrupt(name: str, step: int) -> None:
            if (name, step) == point:
                raise KeyboardInterrupt

        monkeypatch.setattr(faults, "crash_point", interrupt)
        run = tmp_path / f"{point[0]}_{point[1]}"
        args = ["grpo", "--model", str(ckpt), *TINY, "--steps", "3", "--save-every", "100", "-o", str(run)]
        result = runner.invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["status"] == "interrupted" and summary["step"] == 1
        assert checkpoint_steps(run) == [1] and [r["step"] for r in read_metrics(run)] == [1]
        assert read_meta(run / "checkpoints" / "step_1")["updates"] == 2
        return _params(run / "checkpoints" / "step_1")

    before_training, mid_training = interrupted_at(("rollout", 2)), interrupted_at(("update", 2))
    for name, value in before_training.items():
        np.testing.assert_array_equal(mid_training[name], value, err_msg=name)


def test_steps_reuse_the_buffers_of_the_state_before_on_the_kept_heap(ckpt, tmp_path, monkeypatch):
    """On the kept CPU heap, step 3 on writes its working copy into the buffers of the state step 2
    started from (not steps 1-2: the run's first state shares its buffers with the KL reference, beta
    0.04 here, which must stay alive); the run's results are bit for bit those of fresh copies."""
    from mllmjax import runtime
    from mllmjax.grpo import stages

    monkeypatch.syspath_prepend(str(TESTS))
    copy_state = stages.copy_state

    def run(kept: bool) -> tuple[list[bool], Path]:
        monkeypatch.setattr(runtime, "keeps_heap", lambda environ=None: kept)
        reused = []

        def pointers(tree) -> list[int]:  # every device's buffer of every leaf
            return [s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(tree) for s in x.addressable_shards]

        def spy(state, *, into=None):
            targets = pointers(into) if into is not None else None
            out = copy_state(state, into=into)
            if targets is not None:
                assert pointers(out) == targets
                assert all(x.is_deleted() for x in jax.tree.leaves(into))
            reused.append(targets is not None)
            return out

        monkeypatch.setattr(stages, "copy_state", spy)
        out = tmp_path / f"kept_{kept}"
        args = ["grpo", "--model", str(ckpt), *TINY, "--steps", "4", "--save-every", "100", "-o", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return reused, out

    (fresh, plain), (reused, kept) = run(False), run(True)
    assert fresh == [False] * 4 and reused == [False, False, True, True]
    expected, got = (_train_state(run / "checkpoints" / "step_4") for run in (plain, kept))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)

    def steady(row: dict) -> dict:
        return {k: v for k, v in row.items() if k not in MACHINE_KEYS and not k.endswith("_s")}

    assert [steady(r) for r in read_metrics(kept)] == [steady(r) for r in read_metrics(plain)]


def test_bad_input(ckpt, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    run = tmp_path / "run"
    run.mkdir()
    (run / "x").write_text("mine")
    r = runner.invoke(app, ["grpo", "--model", str(ckpt), "--data", "builtin:sums", "-o", str(run)])
    assert r.exit_code == 2 and "--resume" in r.output and (run / "x").read_text() == "mine"
    r = runner.invoke(app, ["grpo", "--resume", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not a grpo run directory" in r.output
    r = runner.invoke(
        app, ["grpo", "--data", "builtin:sums", "--dynamic-sampling", "--advantage", "reinforce"]
    )
    assert r.exit_code == 2 and "per-group advantage estimator" in r.output
    r = runner.invoke(
        app, ["grpo", "--model", str(ckpt), "--data", "nosuch.jsonl", "-o", str(tmp_path / "r")]
    )
    assert r.exit_code == 2 and not (tmp_path / "r").exists()
    r = runner.invoke(app, ["grpo", "--data", "builtin:sums", "--temperature", "0"])
    assert r.exit_code == 2 and "temperature" in r.output
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # an extra not installed: import fails
    r = runner.invoke(
        app, ["grpo", "--data", "builtin:sums", "--report-to", "tensorboard", "-o", str(tmp_path / "tb")]
    )
    assert r.exit_code == 2 and "mllmjax[tensorboard]" in r.output and not (tmp_path / "tb").exists()
    r = runner.invoke(app, ["grpo", "--data", "builtin:sums", "--report-to", "mlflow"])
    assert r.exit_code == 2 and "tensorboard, wandb" in r.output


def test_sample_mesh_reshards_the_parameters_for_rollouts(ckpt, tmp_path, monkeypatch):
    """Training fsdp=8 with rollouts tensor-parallel (data=2, tensor=4) on the same 8 devices gives
    the completions and the update that rollouts on the training mesh give."""
    import jax
    import numpy as np

    from mllmjax.checkpoint import load_checkpoint
    from mllmjax.records import read_records

    monkeypatch.syspath_prepend(str(TESTS))
    base = ["grpo", "--model", str(ckpt), *TINY, "--steps", "1", "--save-rollouts", "--mesh", "fsdp=8"]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*base, "--sample-mesh", "data=2,tensor=4", "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    a, b = (read_records(tmp_path / x / "rollouts/step_1.jsonl") for x in "ab")
    assert [x.completion_ids for x in a] == [x.completion_ids for x in b]
    diffs = [
        abs(p - q) for x, y in zip(a, b, strict=True) for p, q in zip(x.logprobs, y.logprobs, strict=True)
    ]
    assert max(diffs) < 1e-5
    pa, pb = (load_checkpoint(tmp_path / x / "checkpoints/step_1").params for x in "ab")
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    r = runner.invoke(app, [*base, "--sample-mesh", "data=3", "-o", str(tmp_path / "c")])
    assert r.exit_code == 2 and not (tmp_path / "c").exists()


def test_memory_estimate_refuses_what_cannot_fit(ckpt, tmp_path, monkeypatch):
    from mllmjax import memory

    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setattr(memory, "available_bytes", lambda devices=None: 1000)
    r = runner.invoke(app, ["grpo", "--model", str(ckpt), *TINY, "--steps", "1", "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and "needs about" in r.output and "--batch-size" in r.output, r.output
    assert "memory per device, rollout: params" in r.output and "kv_cache" in r.output
    assert "memory per device, update: params" in r.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "extra, rows", [([], 8), (["--dynamic-sampling"], 64), (["--dynamic-sampling", "--batch-size", "16"], 16)]
)
def test_rollout_memory_estimate_counts_the_rounds_batch(ckpt, tmp_path, monkeypatch, extra, rows):
    """The rollout's estimate decodes the step's groups, or with --dynamic-sampling the full --batch-size
    batch that each round over-samples (2 prompts x G=4: 8 rows; the default batch of 64: 16 groups)."""
    from mllmjax import memory

    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setattr(memory, "available_bytes", lambda devices=None: 1000)
    seen = []
    estimate = memory.estimate_sampling
    monkeypatch.setattr(
        memory, "estimate_sampling", lambda cfg, **kw: seen.append(kw["rows"]) or estimate(cfg, **kw)
    )
    r = runner.invoke(
        app, ["grpo", "--model", str(ckpt), *TINY, *extra, "--steps", "1", "-o", str(tmp_path / "r")]
    )
    assert r.exit_code == 2 and "needs about" in r.output, r.output
    assert seen == [rows]


def test_resume_refuses_changed_settings(ckpt, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    run = tmp_path / "run"
    args = ["grpo", "--model", str(ckpt), *TINY, "--steps", "1", "--ppo-epochs", "1", "-o", str(run)]
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, ["grpo", "--resume", str(run), "--lr", "0.5"])
    assert r.exit_code == 2 and "--lr" in r.output and "differs" in r.output
    r = runner.invoke(app, ["grpo", "--resume", str(run), "--steps", "1"])  # same value: fine, nothing to do
    assert r.exit_code == 0, r.output


def test_config_validation():
    with pytest.raises(Exception, match="group-size"):
        GRPOConfig(group_size=1)
    with pytest.raises(Exception, match="optimizer"):
        GRPOConfig(optimizer="sgd")


# The embedded default (`mllmjax grpo`, seed 0) as measured on the 2-core machine: each step's metrics
# (step_s, compile_s, sys_s, rollout_s, rollout_compile_s, rollout_sys_s, sampling_rounds).
DEFAULT_RUN = [
    (149.4, 66.5, 40.9, 71.9, 29.3, 9.0, 4), (63.1, 19.3, 3.9, 18.9, 0.0, 0.8, 2),
    (29.4, 0.0, 2.5, 8.9, 0.0, 0.4, 1), (27.2, 0.0, 1.6, 7.9, 0.0, 0.3, 1),
    (27.2, 0.0, 0.8, 7.8, 0.0, 0.4, 1), (43.8, 15.7, 4.4, 4.5, 0.0, 0.2, 1),
    (36.8, 0.0, 1.7, 18.2, 0.0, 0.7, 3), (27.8, 0.0, 0.4, 8.4, 0.0, 0.4, 1),
    (26.5, 0.0, 0.4, 7.7, 0.0, 0.3, 1), (23.8, 0.0, 1.8, 4.4, 0.0, 0.2, 1),
    (36.9, 0.0, 0.8, 17.3, 0.0, 0.7, 2), (57.8, 25.3, 3.0, 12.1, 0.0, 0.5, 2),
    (24.5, 0.0, 0.9, 5.4, 0.0, 0.2, 1), (37.6, 0.0, 1.9, 16.0, 0.0, 0.7, 2),
    (21.1, 0.0, 0.3, 4.2, 0.0, 0.2, 1), (33.6, 0.0, 0.7, 9.6, 0.0, 0.5, 1),
    (29.7, 0.0, 0.6, 10.7, 0.0, 0.4, 2), (27.8, 0.0, 0.5, 7.7, 0.0, 0.3, 1),
]  # fmt: skip
_ROW_KEYS = (
    "step_s",
    "compile_s",
    "sys_s",
    "rollout_s",
    "rollout_compile_s",
    "rollout_sys_s",
    "sampling_rounds",
)


def test_eta_from_the_runs_own_step_times():
    assert eta_seconds([], 18) is None
    # The first step: 150 s, 60 of them compiling (20 in the rollout), 20 s of system time on 2 cores
    # (4 in the rollout), 4 sampling rounds. Less compile and system time: 150 - 60 - 10 = 80 s, of
    # which the rollout is 60 - 20 - 2 = 38 s; its rounds count as one: 80 - 38 * 3 / 4 = 51.5 s.
    first = dict(zip(_ROW_KEYS, (150.0, 60.0, 20.0, 60.0, 20.0, 4.0, 4), strict=True))
    assert steady_step_seconds(first, first=True, cores=2) == pytest.approx(51.5)
    assert steady_step_seconds(first, cores=2) == pytest.approx(80.0)  # a later step keeps its rounds
    assert eta_seconds([first], 17, cores=2) == pytest.approx(17 * 51.5)
    assert eta_seconds([first, {**first, "compile_s": 0.0, "sys_s": 0.0}], 16, cores=2) == pytest.approx(
        16 * (51.5 + 150.0) / 2
    )
    assert eta_seconds([first], 0) == 0.0
    # On the measured run, every estimate from the first step on is within 30% of the time the run then
    # took (the first one, which the bar is about, within 1%).
    rows = [dict(zip(_ROW_KEYS, r, strict=True)) for r in DEFAULT_RUN]
    for done in range(1, len(rows)):
        eta = eta_seconds(rows[:done], len(rows) - done, cores=2)
        actual = sum(r["step_s"] for r in rows[done:])
        assert abs(eta - actual) <= 0.3 * actual, (done, eta, actual)


def test_terms_that_are_not_computed_show_off(capsys):
    from rich.console import Console

    from mllmjax_cli.grpo_display import Display

    assert terms_off(GRPOConfig()) == frozenset({"eval/accuracy", "sampling_rounds"})
    cfg = GRPOConfig(data="builtin:sums", steps=3, beta=0.0, eval_every=0, ppo_epochs=1)
    assert terms_off(cfg) == frozenset({"kl", "eval/accuracy", "clip_frac", "sampling_rounds"})
    # A second minibatch updates off-policy (the first one moved the parameters): its ratio can clip.
    assert "clip_frac" not in terms_off(dataclasses.replace(cfg, minibatches=2))
    display = Display(cfg)
    display.on_event("start", {"step": 0, "steps": 3, "resumed": False})
    display.on_metrics({"step": 1, "reward": 0.5, "accuracy": 0.25, "kl": 0.0, "clip_frac": 0.0,
                        "sampling_rounds": 1, "entropy": 1.5, "rollout_s": 1.0, "step_s": 2.0})  # fmt: skip
    line = capsys.readouterr().err
    assert "kl off" in line and "clip off" in line and "kl 0.0000" not in line, line
    assert re.search(r"eta \d+:\d\d:\d\d", line), line  # an estimate from the first step on
    console = Console(record=True, width=200)
    console.print(display._table())
    table = " ".join(console.export_text().split())
    for label in ("eval acc off", "kl off", "clip frac off", "rounds off"):
        assert label in table, table
    assert "reward 0.500" in table and "entropy 1.500" in table


def test_plain_log_line_of_a_beta_0_run(ckpt, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    run = tmp_path / "run"
    args = ["grpo", "--model", str(ckpt), *TINY, "--beta", "0", "--steps", "2", "-o", str(run)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("step ")]
    assert len(lines) == 2 and all("kl off" in x for x in lines), result.output
    assert re.search(r"step 1/2  eta \d+:\d\d:\d\d ", lines[0]) and "eta 0:00:00" in lines[1], lines
    assert all(r["compile_s"] >= r["rollout_compile_s"] >= 0 for r in read_metrics(run))


def test_estimator_switch_and_replay_buffer_log_their_work_and_resume_exactly(ckpt, tmp_path):
    """--estimator-switch entropy<100 (the tiny model's entropy is ~5.5: every step after the first
    switches) and --replay-prob 0.5: step 1 samples 2 prompts x 4 with grpo and fills the buffer; step 2
    samples 8 prompts x 1 with reinforce, some of them continuations of step 1's partial completions.
    Each row says which estimator ran and why; a run killed in step 2 and resumed from step 1's
    checkpoint equals an uninterrupted one bit for bit (the buffer is saved in the checkpoint)."""
    base = ["--model", str(ckpt), *TINY, "--steps", "2", "--save-every", "1", "--keep", "3",
            "--estimator-switch", "entropy<100", "--replay-prob", "0.5", "--replay-size", "5"]  # fmt: skip
    straight = tmp_path / "straight"
    done = _grpo([*base, "--save-rollouts", "-o", str(straight)])
    assert done.returncode == 0, done.stderr
    rows = read_metrics(straight)
    assert [r["estimator"] for r in rows] == ["grpo", "reinforce"]
    assert rows[0]["switch_reason"] == "no entropy measured yet"
    assert rows[1]["switch_reason"] == f"entropy {rows[0]['entropy']:.4g} < 100"
    assert [r["groups_trained"] for r in rows] == [2, 8] and rows[0]["replayed"] == 0 and rows[1]["replayed"] > 0
    assert "step 2: entropy" in done.stderr and "sampling 8 prompts x 1 with reinforce" in done.stderr
    # The buffer: one partial completion per fresh group, the newest 5 kept.
    meta = read_meta(straight / "checkpoints" / "step_1")["grpo"]
    assert len(meta["replay"]) == 2 and all(e["step"] == 1 for e in meta["replay"])
    step1 = [json.loads(x) for x in (straight / "rollouts" / "step_1.jsonl").read_text().splitlines()]
    step2 = [json.loads(x) for x in (straight / "rollouts" / "step_2.jsonl").read_text().splitlines()]
    continued = [r for r in step2 if "replay" in r["meta"]]
    assert len(continued) == rows[1]["replayed"] and all(r["meta"]["replay"]["from_step"] == 1 for r in continued)
    # A continuation's prompt is a step-1 prompt followed by the first tokens of one of its completions.
    for c in continued:
        assert any(
            len(c["prompt_ids"]) > len(r["prompt_ids"])
            and c["prompt_ids"] == r["prompt_ids"] + r["completion_ids"][: len(c["prompt_ids"]) - len(r["prompt_ids"])]
            for r in step1
        )  # fmt: skip
    assert len(read_meta(straight / "checkpoints" / "step_2")["grpo"]["replay"]) <= 5

    run = tmp_path / "killed"
    first_try = _grpo([*base, "-o", str(run)], crash="rollout@2")
    assert first_try.returncode == -signal.SIGKILL
    last = _grpo(["--resume", str(run)])
    assert last.returncode == 0, last.stderr
    a, b = _train_state(straight / "checkpoints" / "step_2"), _train_state(run / "checkpoints" / "step_2")
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    for x, y in zip(rows, read_metrics(run), strict=True):
        same = {k: v for k, v in x.items() if not k.endswith("_s") and k not in MACHINE_KEYS}
        assert same == {k: y[k] for k in same}, x["step"]
    assert read_meta(run / "checkpoints" / "step_2")["grpo"] == {
        **read_meta(straight / "checkpoints" / "step_2")["grpo"], "run": str(run)
    }
