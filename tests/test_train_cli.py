"""`mllmjax train`: the checkpoint it writes, bit-for-bit resume, and bad input."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from mllmjax.checkpoint import load_checkpoint
from mllmjax.errors import BadInputError
from mllmjax.loss import LossConfig
from mllmjax.optim import OptimConfig
from mllmjax.records import read_records, write_records
from mllmjax.trainer import TrainConfig, Trainer
from mllmjax.training import batch_from_records
from mllmjax_cli.main import app

runner = CliRunner()
TRAIN = [
    "--ppo-epochs",
    "2",
    "--minibatches",
    "2",
    "--lr",
    "1e-3",
    "--steps",
    "2",
    "--beta",
    "0.04",
    "--seed",
    "5",
]


@pytest.fixture(scope="module")
def setup(scored_files):
    """A converted tiny model and two scored rollout files with random advantages (conftest)."""
    return scored_files


def train(setup, ckpt, scored, out, *extra):
    return runner.invoke(
        app, ["train", str(setup / ckpt), str(setup / scored), "-o", str(setup / out), *TRAIN, *extra]
    )


def test_groups_of_the_file_run_their_prompt_once(setup):
    """The scored file holds groups of 4 rows of one prompt: by default `train` runs each prompt once
    (the estimate's activations shrink with the tokens), and the update equals --no-shared-prompt's,
    which runs every row whole, within float32 rounding."""
    runs = {"on": train(setup, "ck0", "s1.jsonl", "shared-on"),
            "off": train(setup, "ck0", "s1.jsonl", "shared-off", "--no-shared-prompt")}  # fmt: skip
    activations = {}
    for name, result in runs.items():
        assert result.exit_code == 0, result.output
        activations[name] = float(re.search(r"activations ([\d.]+) MB", result.output).group(1))
    assert activations["on"] < activations["off"]
    a, b = load_checkpoint(setup / "shared-on").params, load_checkpoint(setup / "shared-off").params
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


def test_writes_a_resumable_child_checkpoint(setup):
    result = train(setup, "ck0", "s1.jsonl", "ck1")
    assert result.exit_code == 0, result.output
    meta = json.loads((setup / "ck1/mllmjax.json").read_text())
    assert meta["parent"] == str(setup / "ck0") and meta["step"] == 1 and meta["updates"] == 4
    assert (setup / "ck1/opt_state").is_dir() and (setup / "ck1/tokenizer.json").is_file()
    history = [json.loads(line) for line in (setup / "ck1/train_metrics.jsonl").read_text().splitlines()]
    assert len(history) == 4
    for key in ("loss", "policy_loss", "kl", "entropy", "clip_low", "clip_high", "ratio_mean", "ratio_min",
                "ratio_max", "grad_norm", "lr", "tokens_per_s"):  # fmt: skip
        assert all(np.isfinite(m[key]) for m in history), key
    assert history[0]["kl"] == 0 and history[-1]["kl"] > 0  # KL to the start policy grows
    assert history[0]["lr"] > 0
    exported = runner.invoke(app, ["export", str(setup / "ck1"), "-o", str(setup / "ck1-hf")])
    assert exported.exit_code == 0, exported.output
    assert (setup / "ck1-hf/tokenizer.json").is_file() and not (setup / "ck1-hf/train_metrics.jsonl").exists()
    before, after = load_checkpoint(setup / "ck0").params, load_checkpoint(setup / "ck1").params
    assert not np.array_equal(np.asarray(before["embed"]), np.asarray(after["embed"]))


def test_resume_equals_an_uninterrupted_run_bitwise(setup):
    assert train(setup, "ck0", "s1.jsonl", "r1").exit_code == 0
    result = train(setup, "r1", "s2.jsonl", "r2", "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((setup / "r2/mllmjax.json").read_text())["updates"] == 8

    ck0 = load_checkpoint(setup / "ck0")
    cfg = TrainConfig(
        loss=LossConfig(beta=0.04),
        optim=OptimConfig(peak_lr=1e-3, total_updates=8),
        ppo_epochs=2,
        minibatches=2,
    )
    trainer = Trainer(ck0.cfg, cfg, ref_params=ck0.params)
    state = trainer.init_state(ck0.params, jax.random.key_data(jax.random.key(5)))
    for name in ("s1", "s2"):
        state, _ = trainer.train_on_batch(state, batch_from_records(read_records(setup / f"{name}.jsonl")))
    resumed = load_checkpoint(setup / "r2").params
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _bad(setup, records, out, fragment, *extra):
    if isinstance(records, str):
        (setup / "bad.jsonl").write_text(records)
    else:
        write_records(records, setup / "bad.jsonl", force=True)
    existed = (setup / out).exists()
    result = runner.invoke(
        app, ["train", str(setup / "ck0"), str(setup / "bad.jsonl"), "-o", str(setup / out), *extra]
    )
    assert result.exit_code == 2, result.output
    assert fragment in result.output and result.output.strip().count("\n") == 0, result.output
    assert (setup / out).exists() == existed and (not existed or not any((setup / out).iterdir()))


def test_a_replayed_first_record_does_not_fail_the_tokenizer_check(setup):
    """grpo's replay buffer writes continuation records: the prompt followed by a partial completion,
    whose decoded text need not re-encode to the same ids. The check skips them and reads the first
    plain record; a file of continuations alone is not refused for it."""
    from mllmjax.records import CONTINUATION_KEY
    from mllmjax.training import check_records

    good = read_records(setup / "s1.jsonl")
    head = load_checkpoint(setup / "ck0", load_params=False)
    tokenizer, vocab = head.tokenizer(), head.cfg.vocab_size
    # As rollout builds it: prompt text + decoded prefix, prompt ids + prefix ids (a special token in
    # the prefix decodes to nothing: re-encoding the text differs).
    prefix_ids = [tokenizer.get_vocab()["<|im_end|>"], *good[0].completion_ids[:2]]
    prefix = tokenizer.decode(prefix_ids, skip_special_tokens=True)
    replayed = dataclasses.replace(
        good[0],
        prompt=good[0].prompt + prefix,
        prompt_ids=good[0].prompt_ids + prefix_ids,
        meta={CONTINUATION_KEY: {"prefix": prefix, "from_step": 1}},
    )
    assert tokenizer(replayed.prompt, add_special_tokens=False)["input_ids"] != replayed.prompt_ids
    check_records([replayed, *good], tokenizer, vocab, "s1.jsonl")
    check_records([replayed], tokenizer, vocab, "s1.jsonl")
    with pytest.raises(BadInputError, match="different tokenizer"):
        check_records([replayed, dataclasses.replace(good[0], prompt_ids=good[0].prompt_ids[1:])],
                      tokenizer, vocab, "s1.jsonl")  # fmt: skip


def test_bad_input(setup):
    good = read_records(setup / "s1.jsonl")
    _bad(setup, [dataclasses.replace(r, completion_ids=[999] * len(r.completion_ids)) for r in good], "x1",
         "different tokenizer")  # fmt: skip
    _bad(
        setup,
        [dataclasses.replace(r, prompt_ids=r.prompt_ids[1:]) for r in good],
        "x2",
        "different tokenizer",
    )
    _bad(
        setup,
        [dataclasses.replace(r, completion_ids=[], logprobs=[]) for r in good],
        "x3",
        "no completion tokens",
    )
    nan = re.sub(r'"advantage": ?[-0-9.e]+', '"advantage": NaN', (setup / "s1.jsonl").read_text())
    _bad(setup, nan, "x4", "advantage")
    _bad(setup, read_records(setup / "s1-raw.jsonl"), "x5", "score")
    (setup / "x6").mkdir()
    _bad(setup, good, "x6", "--force")
    _bad(setup, good, "x7", "no opt_state", "--resume")  # ck0 has no optimizer state
    _bad(setup, good, "x8", "'sideways'", "--layer-loop", "sideways")


def test_prints_the_memory_estimate_and_refuses_what_cannot_fit(setup, monkeypatch):
    from mllmjax import memory

    result = train(setup, "ck0", "s1.jsonl", "m1")
    assert result.exit_code == 0, result.output
    assert re.search(
        r"memory per device: params [0-9.]+ [MG]B .* = [0-9.]+ [MG]B of [0-9.]+ GB available", result.output
    )
    monkeypatch.setattr(memory, "available_bytes", lambda devices=None: 1000)
    result = train(setup, "ck0", "s1.jsonl", "m2")
    assert result.exit_code == 2
    assert re.search(r"error: this run needs about [0-9.]+ GB per device .* --micro-batch", result.output)
    assert not (setup / "m2").exists()


def test_bfloat16_compute_writes_float32_master_weights(setup):
    result = train(setup, "ck0", "s1.jsonl", "bf1", "--compute-dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    params = load_checkpoint(setup / "bf1").params
    assert {x.dtype.name for x in jax.tree.leaves(params)} == {"float32"}
    _bad(setup, read_records(setup / "s1.jsonl"), "bf2", "compute dtype", "--compute-dtype", "int8")
    _bad(setup, read_records(setup / "s1.jsonl"), "bf3", "needs a GPU", "--attention", "cudnn")


def test_resume_refuses_a_damaged_optimizer_state(setup, monkeypatch):
    """Bytes overwritten in a file of opt_state/: `train --resume` names the damaged array (the
    optimizer state is checksummed like the parameters), and `--no-verify` skips the check."""
    import shutil

    assert train(setup, "ck0", "s1.jsonl", "d1").exit_code == 0
    shutil.copytree(setup / "d1", setup / "d1-damaged")
    sums = json.loads((setup / "d1/mllmjax.json").read_text())["checksums"]
    assert set(sums) == {"algorithm", "params", "opt_state"} and len(sums["opt_state"]) > len(sums["params"])
    data = max((setup / "d1-damaged/opt_state").rglob("d/*"), key=lambda f: f.stat().st_size)
    with data.open("r+b") as f:
        f.seek(data.stat().st_size // 2)
        f.write(b"\x55" * 64)
    result = train(setup, "d1-damaged", "s2.jsonl", "d2", "--resume")
    assert result.exit_code == 2
    assert re.search(r"opt_state: array opt_state/\S+ does not match its checksum", result.output), (
        result.output
    )
    assert not (setup / "d2").exists()
    monkeypatch.setenv("MLLMJAX_NO_VERIFY", "0")  # --no-verify sets it in this process: restored after
    unchecked = runner.invoke(app, ["--no-verify", "train", str(setup / "d1-damaged"), str(setup / "s2.jsonl"),
                                    "-o", str(setup / "d2"), *TRAIN, "--resume"])  # fmt: skip
    assert unchecked.exit_code == 0, unchecked.output
