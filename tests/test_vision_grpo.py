"""`mllmjax grpo` on a vision-language checkpoint, on a tiny LLaVA and Gemma 3 built offline (the
`converted` fixture of test_vision_sample): the visual built-in task runs with its pictures through
rollout, score and train; the run directory keeps the pictures its steps used; the checkpoints are the
whole LLaVA with the tower frozen; a step on 8 fake devices equals the step on one; the run resumes
exactly; a rollout on 2 processes x 4 devices equals 1 x 8; what is not supported (grpo on several
processes among it) is one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_vision_sample import _expect_bad, converted, run  # noqa: F401  (converted: the fixture)
from xla_flags import xla_flags

from mllmjax.checkpoint import load_checkpoint, read_meta

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# 2 prompts x G=2 per step, 8 new tokens, a reward with signal on a random model (grpo_rewards.even).
TINY = ["--data", "builtin:count", "-G", "2", "--prompts-per-step", "2", "--max-new-tokens", "8",
        "--reward", "correct=1.0", "--reward-fn", "grpo_rewards:even=1", "--lr", "1e-3", "--beta", "0.04",
        "--optimizer", "adamw", "--seed", "3", "--no-probe", "--save-rollouts"]  # fmt: skip


def _flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _params(path: Path) -> dict[str, np.ndarray]:
    return _flat(load_checkpoint(path, vision_language=True).params)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(converted, tmp_path_factory) -> tuple[Path, Path]:  # noqa: F811
    """(the start checkpoint, a 2-step run on builtin:count with a held-out eval at steps 0 and 2)."""
    _, root = converted
    out = tmp_path_factory.mktemp("vgrpo") / "run"
    result = run("grpo", "--model", root / "ck", *TINY, "--steps", 2, "--eval-every", 2,
                 "--eval-num-prompts", 2, "--save-every", 1, "--keep", 2, "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    return root / "ck", out


@pytest.mark.parametrize("converted", ["clip-llama", "siglip-gemma3"], indirect=True)
def test_grpo_runs_a_visual_task_with_its_pictures_and_saves_the_whole_model(run_dir):
    start, out = run_dir
    rows = [m for m in _lines(out / "metrics.jsonl") if "reward" in m]
    assert [m["step"] for m in rows] == [1, 2] and all(m["updates"] > 0 for m in rows)
    evals = [m for m in _lines(out / "metrics.jsonl") if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 2] and all(m["eval/problems"] == 2 for m in evals)
    # The pictures of the problems the steps and the evaluation used, and no others.
    pictures = sorted(p.name for p in (out / "images").iterdir())
    assert sum("-train-" in n for n in pictures) == 2 * 2 and sum("-test-" in n for n in pictures) == 2
    used = set()
    for step in (1, 2):
        records = _lines(out / "rollouts" / f"step_{step}.jsonl")
        assert len(records) == 2 * 2
        for r in records:
            assert r["schema"] == "mllmjax.rollout/2"
            [image] = r["images"]
            path = (out / "rollouts" / image["path"]).resolve()
            assert path.parent == (out / "images").resolve()
            assert hashlib.sha256(path.read_bytes()).hexdigest() == image["sha256"]
            used.add(path.name)
    assert len(used) == 2 * 2  # two new prompts per step
    # The checkpoint is the whole model: the tower frozen bitwise, the projector and language model trained.
    meta = read_meta(out / "checkpoints" / "step_2", vision_language=True)
    assert meta["family"] == read_meta(start, vision_language=True)["family"]
    assert meta["trained"] == ["projector", "text"]
    before, after = _params(start), _params(out / "checkpoints" / "step_2")
    assert before.keys() == after.keys()
    for key in before:
        same = np.array_equal(before[key], after[key])
        assert same if key.startswith("['vision']") else True, key
    for part in ("['projector']", "['text']"):
        assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith(part)), part
    # and the other commands read it with its processor
    result = run("eval", out / "checkpoints" / "step_2", "--data", "builtin:count", "--num-prompts", 1,
                 "--max-new-tokens", 4, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output


def _one_device(args: list[object]) -> subprocess.CompletedProcess:
    paths = [str(ROOT / "lib"), str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "XLA_FLAGS": xla_flags()}
    return subprocess.run([sys.executable, "-m", "mllmjax_cli.main", "grpo", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_a_step_on_8_devices_equals_the_step_on_one_and_resumes_exactly(run_dir, tmp_path):
    """Step 1 of the 8-device run (fsdp=8, the default mesh here) against the same run on one device
    (a process without the fake devices): the same completions and an update within float32 reduction
    order. Then the 8-device run, cut back to its step 1 checkpoint and resumed, reaches its own step 2
    bitwise."""
    start, out = run_dir
    one = tmp_path / "one"
    result = _one_device(["--model", start, *TINY, "--steps", 2, "--eval-every", 0, "--save-every", 1,
                          "--keep", 2, "-o", one])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for r8, r1 in zip(_lines(out / "rollouts" / "step_1.jsonl"), _lines(one / "rollouts" / "step_1.jsonl"), strict=True):
        assert r8["completion_ids"] == r1["completion_ids"] and r8["images"][0]["sha256"] == r1["images"][0]["sha256"]
        np.testing.assert_allclose(r8["logprobs"], r1["logprobs"], atol=1e-5)
    m8, m1 = (next(m for m in _lines(d / "metrics.jsonl") if m.get("step") == 1 and "loss" in m) for d in (out, one))
    for key in ("loss", "kl", "grad_norm", "reward"):
        assert m8[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    a, b = _params(out / "checkpoints" / "step_1"), _params(one / "checkpoints" / "step_1")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "step_2")
    resumed = run("grpo", "--resume", cut)
    assert resumed.exit_code == 0, resumed.output
    full, got = _params(out / "checkpoints" / "step_2"), _params(cut / "checkpoints" / "step_2")
    for key in full:
        np.testing.assert_array_equal(got[key], full[key], err_msg=key)

    def measured(rows: list[dict]) -> list[dict]:  # without the times and the process's memory
        return [{k: v for k, v in m.items() if not k.endswith("_s") and k != "peak_rss_gb"} for m in rows]

    assert measured(_lines(cut / "metrics.jsonl")) == measured(_lines(out / "metrics.jsonl"))


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_compute_dtype_decodes_in_bfloat16(run_dir, tmp_path):
    """--compute-dtype bfloat16: the rollouts' log-probs move by bfloat16's rounding, no more."""
    start, out = run_dir
    bf16 = tmp_path / "bf16"
    result = run("grpo", "--model", start, *TINY, "--steps", 1, "--eval-every", 0, "--compute-dtype", "bfloat16",
                 "-o", bf16)  # fmt: skip
    assert result.exit_code == 0, result.output
    # the first sampled token's log-prob, where both runs drew the same token
    pairs = [(g["logprobs"][0], r["logprobs"][0]) for g, r in zip(_lines(bf16 / "rollouts" / "step_1.jsonl"),
             _lines(out / "rollouts" / "step_1.jsonl"), strict=True) if g["completion_ids"][:1] == r["completion_ids"][:1]]  # fmt: skip
    assert len(pairs) >= 2
    diffs = [abs(a - b) for a, b in pairs]
    assert max(diffs) <= 0.05 and max(diffs) > 0


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_lora_on_a_vision_model_saves_adapters_and_resumes_exactly(run_dir, tmp_path):
    """--lora-rank: the checkpoints hold the language model's adapters on the start model (its tower
    and projector untouched), `eval` reads one merged, and a run cut back to step 1 and resumed reaches
    step 2's adapters bitwise. With --sample-mesh (tensor-parallel decode on a resharded copy, the
    adapters merged into it) step 1's completions, from fresh adapters (b = 0: the start model), are the
    fsdp=8 run's. With --replay-prob 1, step 2 continues step 1's completions after their prompts
    with their pictures, and the resumed run restores the buffer."""
    start, fsdp = run_dir
    root = start.parent
    out = tmp_path / "run"
    result = run("grpo", "--model", start, *TINY, "--steps", 2, "--eval-every", 0, "--save-every", 1,
                 "--keep", 2, "--lora-rank", 4, "--sample-mesh", "data=4,tensor=2", "--replay-prob", 1,
                 "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    step1 = _lines(out / "rollouts" / "step_1.jsonl")
    for got, ref in zip(step1, _lines(fsdp / "rollouts" / "step_1.jsonl"), strict=True):
        assert got["completion_ids"] == ref["completion_ids"]
        np.testing.assert_allclose(got["logprobs"], ref["logprobs"], atol=1e-5)
    rows = [m for m in _lines(out / "metrics.jsonl") if "reward" in m]
    assert rows[0]["replayed"] == 0 and rows[1]["replayed"] > 0
    continued = [r for r in _lines(out / "rollouts" / "step_2.jsonl") if "replay" in r["meta"]]
    assert len(continued) == rows[1]["replayed"] * 2  # G = 2
    first = {r["prompt_id"]: r for r in step1}
    for r in continued:
        source = first[r["prompt_id"]]
        prefix = r["prompt_ids"][len(source["prompt_ids"]) :]
        assert r["prompt_ids"][: len(source["prompt_ids"])] == source["prompt_ids"] and prefix
        assert r["images"] == source["images"] and r["meta"]["replay"]["from_step"] == 1
        assert any(s["completion_ids"][: len(prefix)] == prefix for s in step1 if s["prompt_id"] == r["prompt_id"])
    step2 = out / "checkpoints" / "step_2"
    assert read_meta(step2, vision_language=True)["lora"]["base"] == str((root / "ck").absolute())
    adapters = _flat(load_checkpoint(step2, vision_language=True, adapters=True).params)
    assert all(k.startswith("['layers']") for k in adapters)
    before, after = _params(root / "ck"), _params(step2)
    for key in before:
        if not key.startswith("['text']"):
            np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert any(not np.array_equal(before[k], after[k]) for k in before if k.startswith("['text']"))
    result = run("eval", step2, "--data", "builtin:count", "--num-prompts", 1, "--max-new-tokens", 4, "--json")
    assert result.exit_code == 0, result.output
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "step_2")
    resumed = run("grpo", "--resume", cut)
    assert resumed.exit_code == 0, resumed.output
    got = _flat(load_checkpoint(cut / "checkpoints" / "step_2", vision_language=True, adapters=True).params)
    for key in adapters:
        np.testing.assert_array_equal(got[key], adapters[key], err_msg=key)


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_what_a_vision_run_does_not_support_is_one_line_and_writes_nothing(converted, tmp_path):  # noqa: F811
    _, root = converted
    out = tmp_path / "run"
    result = run("grpo", "--model", root / "ck", *TINY, "--steps", 1, "--lora-rank", 4, "--train-vision", "-o", out)
    _expect_bad(result, "vision-language", "--train-vision")
    assert not out.exists()


@pytest.mark.parametrize("converted", ["clip-llama", "siglip-gemma3"], indirect=True)
def test_the_memory_estimates_prompt_length_is_the_processors(converted, tmp_path):  # noqa: F811
    """`vision_prompt_length` (grpo's memory estimate, no picture read) equals the ids the processor
    makes with the pictures: a visual task's prompts, one whose question holds its image slot, a text one."""
    from PIL import Image

    from mllmjax.data import Problem, load_problems
    from mllmjax.images import load_processor, slot_token
    from mllmjax.rollout import RolloutConfig, encode_vision_prompt, vision_prompt_length
    from mllmjax.settings import Settings

    _, root = converted
    processor = load_processor(root / "ck")
    per_image = load_checkpoint(root / "ck", vision_language=True, load_params=False).cfg.tokens_per_image
    cfg = RolloutConfig.from_settings(Settings(), seed=0)
    problems = load_problems("builtin:count", num=2, image_dir=tmp_path)
    problems += [
        Problem(id="slot", question=f"w1 {slot_token(processor)} w2", answer="1", images=(str(root / "a.png"),)),
        Problem(id="text", question="w3 w4", answer="2"),
    ]
    for p in problems:
        pictures = [Image.open(x) for x in p.images]
        _, ids, _ = encode_vision_prompt(processor, p, cfg, pictures)
        assert vision_prompt_length(processor, p, cfg, per_image) == len(ids), p.id


@pytest.mark.parametrize("converted", ["clip-llama", "siglip-gemma3"], indirect=True)
def test_the_memory_estimate_counts_the_tower_and_projector(converted):  # noqa: F811
    """Against HF's parameter counts: the frozen tower is its params; the trained projector adds AdamW's
    two slots and the KL reference at all times, and in an update its float32 gradient accumulator plus
    one gradient and the new state (params and slots)."""
    from mllmjax.memory import vision_language_bytes

    model, root = converted
    cfg = load_checkpoint(root / "ck", vision_language=True, load_params=False).cfg
    tower = 4 * sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = 4 * sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    alive, update = vision_language_bytes(
        cfg, ("projector", "text"), param_dtype="float32", optimizer="adamw", beta=0.04
    )
    assert alive == tower + projector * (1 + 2 + 1)
    assert update == alive + 2 * projector + 3 * projector
    frozen, _ = vision_language_bytes(cfg, ("text",), param_dtype="float32", optimizer="adamw", beta=0.04)
    assert frozen == tower + projector


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_grpo_on_two_processes_is_refused_in_one_line(converted, tmp_path):  # noqa: F811
    """grpo on a vision-language checkpoint with several processes (hangs seen in step 2's copy of the
    model onto each host) is refused by both processes, one line, nothing written."""
    from test_multihost import _run_pair

    _, root = converted
    out = tmp_path / "run"
    pair = _run_pair(["grpo", "--model", str(root / "ck"), *TINY, "--steps", "1", "-o", str(out)], timeout=300)
    assert [p.returncode for p in pair] == [2, 2], pair[0].stderr[-3000:] + pair[1].stderr[-3000:]
    assert "does not support several processes" in pair[0].stderr and not out.exists()


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_rollout_on_two_processes_equals_one(converted, tmp_path):  # noqa: F811
    """`rollout` of 3 visual prompts on 2 processes (two prompts on process 0, one on process 1) equals
    the one-process file, pictures and all; process 0 alone draws them."""
    from test_multihost import _run_pair

    _, root = converted
    common = ["rollout", str(root / "ck"), "--data", "builtin:count", "--num-prompts", "3", "-G", "2",
              "--max-new-tokens", "6", "--seed", "2", "--temperature", "1.0"]  # fmt: skip
    result = run(*common, "-o", tmp_path / "one.jsonl")
    assert result.exit_code == 0, result.output
    pair = _run_pair([*common, "-o", str(tmp_path / "two.jsonl")], timeout=600)
    assert [p.returncode for p in pair] == [0, 0], pair[0].stderr[-3000:] + pair[1].stderr[-3000:]
    one, two = _lines(tmp_path / "one.jsonl"), _lines(tmp_path / "two.jsonl")

    def key(r: dict) -> tuple:  # the pictures by name and content (each file beside its records)
        pictures = [(Path(x["path"]).name, x["sha256"]) for x in r["images"]]
        return r["group"], r["sample"], r["completion_ids"], pictures

    assert [key(r) for r in one] == [key(r) for r in two]
    logprobs = [[x for r in records for x in r["logprobs"]] for records in (one, two)]
    np.testing.assert_allclose(logprobs[1], logprobs[0], atol=1e-5)
    names = sorted(p.name for p in (tmp_path / "two.jsonl.images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one.jsonl.images").iterdir()) and len(names) == 3
