"""Multi-host runs: 2 local processes x 4 fake CPU devices (gloo collectives) against 1 process x 8.

Each process is a real `mllmjax` command started with --coordinator/--num-processes/--process-id, so
this covers jax.distributed start-up, global batches fed from identical host data, Orbax writing one
checkpoint from both processes, and process 0 alone writing metadata and printing.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from hf_models import save_hf_model
from typer.testing import CliRunner
from xla_flags import xla_flags

from mllmjax.checkpoint import load_checkpoint
from mllmjax.convert import convert
from mllmjax.records import read_records, write_records
from mllmjax_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--ppo-epochs", "2", "--minibatches", "2", "--lr", "1e-3", "--steps", "2", "--beta", "0.04",
         "--seed", "5", "--optimizer", "adamw", "--mesh", "fsdp=-1"]  # fmt: skip


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(devices)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "lib"), str(ROOT), str(ROOT / "tests")])
    env["PYTHONFAULTHANDLER"] = "1"  # a process stopped by SIGABRT prints its threads' stacks
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mllmjax_cli.main", *args]


def _start_pair(
    args: list[str], stdout: int = subprocess.PIPE, env: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """Start the same command as processes 0 and 1 of a 2-process run, 4 fake devices each."""
    port = _free_port()
    return [
        subprocess.Popen(
            _cli("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *args),
            env={**_env(4), **(env or {})},
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def _run_pair(
    args: list[str], timeout: int = 300, env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess]:
    """Run a 2-process command to the end; (returncode, stdout, stderr) of each process. Past `timeout`
    seconds both are stopped with SIGABRT, which makes them print where each thread was
    (PYTHONFAULTHANDLER), and the test fails with that."""
    procs = _start_pair(args, env=env)
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)
        where = [(p.communicate(timeout=60)[1] or "")[-6000:] for p in procs]
        pytest.fail(f"a 2-process run took over {timeout} s; process 0:\n{where[0]}\nprocess 1:\n{where[1]}")
    finally:
        for p in procs:
            p.kill()
    return results


def _max_diff(a: Path, b: Path) -> float:
    pa, pb = load_checkpoint(a).params, load_checkpoint(b).params
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True)
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multihost")
    save_hf_model("llama-tied", folder / "hf", seed=1)
    convert(str(folder / "hf"), folder / "ck0")
    args = ["rollout", str(folder / "ck0"), "--data", "builtin:sums", "--num-prompts", "2", "-G", "4",
            "--max-new-tokens", "5", "--seed", "1", "-o", str(folder / "raw.jsonl")]  # fmt: skip
    assert CliRunner().invoke(app, args).exit_code == 0
    rng = np.random.default_rng(0)
    records = [
        dataclasses.replace(
            r, rewards={"x": 0.0}, reward=0.0, advantage=float(rng.normal()), reward_errors={}
        )
        for r in read_records(folder / "raw.jsonl")
    ]
    write_records(records, folder / "scored.jsonl")
    return folder


def test_train_on_two_processes_equals_one(setup):
    common = ["train", str(setup / "ck0"), str(setup / "scored.jsonl"), *TRAIN]
    single = subprocess.run(_cli(*common, "-o", str(setup / "single")), env=_env(8), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr
    pair = _run_pair([*common, "-o", str(setup / "multi")])
    assert [p.returncode for p in pair] == [0, 0], pair[0].stderr[-2000:] + pair[1].stderr[-2000:]
    # Process 0 reports; process 1 prints nothing of its own (gloo's connection lines aside).
    assert "memory per device" in pair[0].stderr and "wrote" in pair[0].stderr
    assert "memory per device" not in pair[1].stderr and "wrote" not in pair[1].stderr
    assert _max_diff(setup / "single", setup / "multi") < 1e-5
    assert load_checkpoint(setup / "multi", load_params=False).meta["updates"] == 4
    # One finished directory, no temp directories left by either process.
    assert sorted(p.name for p in setup.iterdir() if p.name.startswith(".")) == []


def test_lora_train_on_two_processes_equals_one(setup):
    """A LoRA step across 2 processes: adapters sharded by the same rules, base frozen and the KL
    reference, an adapter-only checkpoint written from both processes; equal to one process's."""
    common = ["train", str(setup / "ck0"), str(setup / "scored.jsonl"), *TRAIN, "--lora-rank", "4",
              "--lora-targets", "q,v,down", "--lora-dropout", "0.1"]  # fmt: skip
    single = subprocess.run(_cli(*common, "-o", str(setup / "lora-single")), env=_env(8),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr
    pair = _run_pair([*common, "-o", str(setup / "lora-multi")])
    assert [p.returncode for p in pair] == [0, 0], pair[0].stderr[-2000:] + pair[1].stderr[-2000:]
    one = load_checkpoint(setup / "lora-single", adapters=True)
    two = load_checkpoint(setup / "lora-multi", adapters=True, base=one.base)
    assert two.meta["lora"]["base"] == str((setup / "ck0").absolute()) and two.meta["updates"] == 4
    leaves = list(zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True))
    assert leaves and max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in leaves) < 1e-5
    # Only the adapters of the three targets were written (r x (in + out) per target and layer).
    c = two.cfg
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = (c.hidden_size + q) + (c.hidden_size + kv) + (c.intermediate_size + c.hidden_size)
    assert two.meta["num_params"] == c.num_layers * 4 * per_layer


def test_incomplete_multihost_flags_are_refused(setup):
    result = subprocess.run(_cli("--coordinator", "127.0.0.1:1", "train", "x", "y", "-o", str(setup / "z")),
                            env=_env(1), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "needs all of --coordinator, --num-processes and --process-id" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not (setup / "z").exists()


def test_grpo_step_on_two_processes_equals_one(setup):
    common = ["grpo", "--model", str(setup / "ck0"), "--data", "builtin:sums", "-G", "4", "--prompts-per-step", "2",
              "--max-new-tokens", "8", "--reward", "correct=1.0", "--reward-fn", "grpo_rewards:even=1",
              "--lr", "1e-3", "--beta", "0.04", "--optimizer", "adamw", "--seed", "3", "--steps", "1",
              "--mesh", "data=2,fsdp=-1", "--save-rollouts"]  # fmt: skip
    single = subprocess.run(_cli(*common, "-o", str(setup / "g1")), env=_env(8), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr
    log = setup / "reward-log"
    log.mkdir()
    pair = _run_pair([*common, "-o", str(setup / "g2")], env={"MLLMJAX_TEST_REWARD_LOG": str(log)})
    assert [p.returncode for p in pair] == [0, 0], pair[0].stderr[-2000:] + pair[1].stderr[-2000:]
    assert "done: 1 steps" in pair[0].stderr and "done" not in pair[1].stderr
    # Each host sampled and scored its own share, nothing more: one group of the step's two (4 samples),
    # and half of the probe's 8 groups (one --batch-size 64 decode of groups of 4 holds 16; 8 at most).
    scored = sorted(sorted(f.read_text().split()) for f in log.iterdir())
    probe = [[f"probe{g}" for g in range(4 * h, 4 * h + 4) for _ in range(4)] for h in (0, 1)]
    assert scored == [sorted(["0"] * 4 + probe[0]), sorted(["1"] * 4 + probe[1])]
    assert "probe: 8 prompts x 4 completions" in pair[0].stderr and "probe" not in pair[1].stderr
    one = read_records(setup / "g1/rollouts/step_1.jsonl")
    two = read_records(setup / "g2/rollouts/step_1.jsonl")
    assert [r.completion_ids for r in one] == [r.completion_ids for r in two]
    assert [r.reward for r in one] == [r.reward for r in two]
    assert [r.advantage for r in one] == [r.advantage for r in two]
    assert _max_diff(setup / "g1/checkpoints/step_1", setup / "g2/checkpoints/step_1") < 1e-5
    assert len((setup / "g2/metrics.jsonl").read_text().splitlines()) == 1


def test_rollout_on_two_processes_equals_one(setup):
    """3 prompts: process 0 samples two of them and process 1 one, each on its own 4 devices
    (tensor-parallel); the gathered file equals one process's over 8 devices."""
    common = ["rollout", str(setup / "ck0"), "--data", "builtin:sums", "--num-prompts", "3", "-G", "4",
              "--max-new-tokens", "6", "--seed", "2", "--temperature", "1.0"]  # fmt: skip
    single = subprocess.run(_cli(*common, "-o", str(setup / "r1.jsonl")), env=_env(8), capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr
    pair = _run_pair([*common, "--mesh", "tensor=2,fsdp=2", "-o", str(setup / "r2.jsonl")])
    assert [p.returncode for p in pair] == [0, 0], pair[0].stderr[-2000:] + pair[1].stderr[-2000:]
    one, two = read_records(setup / "r1.jsonl"), read_records(setup / "r2.jsonl")
    assert [(r.group, r.sample, r.completion_ids) for r in one] == [
        (r.group, r.sample, r.completion_ids) for r in two
    ]
    np.testing.assert_allclose(
        [x for r in one for x in r.logprobs], [x for r in two for x in r.logprobs], atol=1e-5
    )
    # A mesh for more devices than one host has is refused with one line.
    bad = _run_pair([*common, "--mesh", "tensor=8", "-o", str(setup / "r3.jsonl")])
    assert [p.returncode for p in bad] == [2, 2]
    assert "does not fit one host's 4 devices" in bad[0].stderr and not (setup / "r3.jsonl").exists()


def test_single_host_commands_refuse_multihost_flags(setup):
    args = ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0", "export",
            str(setup / "ck0"), "-o", str(setup / "hf-out")]  # fmt: skip
    result = subprocess.run(_cli(*args), env=_env(1), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "runs on one host" in result.stderr
    assert not (setup / "hf-out").exists()


def test_ctrl_c_to_one_process_stops_all_after_the_same_step(setup):
    """SIGINT reaches process 1 only: both finish the step, agree to stop, write one checkpoint, exit 0."""
    args = ["grpo", "--model", str(setup / "ck0"), "--data", "builtin:sums", "-G", "4", "--prompts-per-step",
            "2", "--max-new-tokens", "8", "--reward", "correct=1.0", "--seed", "3", "--steps", "50",
            "--save-every", "50", "-o", str(setup / "stopped")]  # fmt: skip
    procs = _start_pair(args, stdout=subprocess.DEVNULL)
    try:
        for line in procs[0].stderr:  # process 0 reports each finished step
            if line.startswith("step 1/"):
                break
        procs[1].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0]
    steps = [p.name for p in (setup / "stopped/checkpoints").iterdir()]
    assert len(steps) == 1 and steps[0].startswith("step_")
    done = int(steps[0].split("_")[1])
    assert 1 <= done < 50
    assert len((setup / "stopped/metrics.jsonl").read_text().splitlines()) == done


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"MLLMJAX_DISTRIBUTED": "1"}, True),
        ({"MLLMJAX_COORDINATOR": "h:1"}, True),
        # An srun step of 2 tasks is a multi-host run; the batch step of a 4-task job is not.
        (
            {
                "SLURM_JOB_ID": "7",
                "SLURM_STEP_NODELIST": "n[1-2]",
                "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0",
                "SLURM_NTASKS": "2",
                "SLURM_STEP_NUM_TASKS": "2",
            },
            True,
        ),  # fmt: skip
        (
            {
                "SLURM_JOB_ID": "7",
                "SLURM_STEP_NODELIST": "n1",
                "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0",
                "SLURM_NTASKS": "4",
                "SLURM_STEP_NUM_TASKS": "1",
            },
            False,
        ),  # fmt: skip
    ],
)
def test_when_a_run_is_multihost(monkeypatch, env, expected):
    from mllmjax import distributed

    for key in list(os.environ):
        if key.startswith(("SLURM_", "MLLMJAX_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.requested() is expected
