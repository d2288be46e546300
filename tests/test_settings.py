"""One declaration per setting: the commands' options are derived from the settings' fields."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import typer

from mllmjax.errors import BadInputError
from mllmjax.grpo.config import GRPOConfig
from mllmjax.loss import LossConfig
from mllmjax.optim import OptimConfig
from mllmjax.rollout import RolloutConfig
from mllmjax.sampling import Greedy, Sample, make_strategy
from mllmjax.scoring import ScoreConfig
from mllmjax.settings import DEFAULTS, TRAIN_SETTINGS, Settings
from mllmjax.trainer import TrainConfig
from mllmjax.training import make_train_config
from mllmjax_cli.main import app

FIELDS = {f.name: f for f in dataclasses.fields(GRPOConfig)}
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def _options(command: str) -> dict[str, Any]:
    # By kind, not class: typer vendors its own copy of click.
    return {p.name: p for p in COMMANDS[command].params if p.param_type_name == "option"}


def _cli_default(field: dataclasses.Field) -> object:
    return None if isinstance(field.default, tuple) else field.default  # repeatable: a list, or None


def test_every_run_setting_is_a_grpo_flag_with_the_fields_default_and_help():
    options = _options("grpo")
    for name, field in FIELDS.items():
        option = options[name]
        assert f"--{name.replace('_', '-')}" in option.opts, name
        assert option.default == _cli_default(field), name
        assert option.help == field.metadata["help"], name
    assert set(FIELDS) <= set(options)


@pytest.mark.parametrize("command", ["train", "rollout", "score", "eval", "sample", "convert"])
def test_a_setting_has_one_flag_default_and_help_in_every_command(command):
    # What a command declares differently (its own default, with its reason, beside the command).
    overrides = {
        ("train", "steps"),
        ("eval", "split"),
        ("eval", "temperature"),
        ("score", "group_size"),
        ("sample", "max_new_tokens"),
        ("sample", "system_prompt"),
    }
    grpo = _options("grpo")
    shared = {n: o for n, o in _options(command).items() if n in FIELDS}
    assert shared, command
    for name, option in shared.items():
        assert option.opts == grpo[name].opts, (command, name)
        if (command, name) not in overrides:
            assert (option.default, option.help) == (grpo[name].default, grpo[name].help), (command, name)


def test_train_takes_the_settings_the_train_config_reads():
    options = _options("train")
    assert set(TRAIN_SETTINGS) <= set(options)
    assert options["steps"].default == 1 and _options("grpo")["steps"].default == DEFAULTS.steps == 400
    assert _options("train")["lr"].default == _options("grpo")["lr"].default == OptimConfig().peak_lr


def test_the_system_prompt_flag_has_one_name():
    for command in ("sample", "rollout", "eval", "grpo"):
        opts = {o for p in COMMANDS[command].params for o in getattr(p, "opts", ())}
        assert "--system-prompt" in opts and "--system" not in opts, command


def test_stage_configs_take_their_defaults_from_the_settings():
    loss, optim, train, score = LossConfig(), OptimConfig(), TrainConfig(), ScoreConfig()
    s = DEFAULTS
    assert (loss.clip_low, loss.clip_high, loss.aggregation, loss.beta, loss.kl_estimator, loss.tis_cap) == (
        s.clip_low, s.clip_high, s.loss_agg, s.beta, s.kl, s.tis_cap,
    )  # fmt: skip
    assert (optim.name, optim.peak_lr, optim.warmup_frac, optim.weight_decay) == (
        s.optimizer, s.lr, s.warmup, s.weight_decay,
    )  # fmt: skip
    assert (train.ppo_epochs, train.minibatches, train.micro_batch, train.remat, train.layer_loop,
            train.compute_dtype, train.attention, train.temperature) == (
        s.ppo_epochs, s.minibatches, s.micro_batch, s.remat, s.layer_loop, s.compute_dtype, s.attention,
        s.temperature,
    )  # fmt: skip
    assert (score.rewards, score.reward_fns, score.advantage, score.overlong, score.overlong_penalty) == (
        s.reward, s.reward_fn, s.advantage, s.overlong, s.overlong_penalty,
    )  # fmt: skip
    rollout = RolloutConfig()
    assert (rollout.group_size, rollout.max_new_tokens, rollout.max_batch) == (
        s.group_size, s.max_new_tokens, s.batch_size,
    )  # fmt: skip
    assert rollout.strategy == Sample(temperature=s.temperature, top_k=s.top_k)
    # The train command and the grpo loop build the same TrainConfig from the same settings.
    assert make_train_config(Settings(steps=7)) == GRPOConfig(steps=7).train_config()


def test_the_flag_vocabulary_becomes_a_strategy_in_one_place():
    assert make_strategy() == Sample(temperature=1.0, top_k=50)
    assert make_strategy(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0) == Sample(temperature=0.7)
    assert make_strategy(temperature=0.0) == make_strategy(temperature=0.7, greedy=True) == Greedy()
    with pytest.raises(BadInputError, match="--temperature"):  # greedy ignores it, but it is still checked
        make_strategy(temperature=-1.0, greedy=True)
    cfg = GRPOConfig().rollout_config(seed=3, group_size=1, greedy=True)
    assert (cfg.strategy, cfg.group_size, cfg.seed) == (Greedy(), 1, 3)


def test_a_bad_temperature_is_rejected_once_with_the_flag_in_the_message():
    with pytest.raises(BadInputError, match=r"--temperature must be finite and >= 0 \(0 = greedy\), got -1.0"):
        RolloutConfig.from_settings(Settings(temperature=-1.0), seed=0)
    with pytest.raises(BadInputError, match=r"--temperature must be finite and >= 0 \(0 = greedy\), got -0.5"):
        make_strategy(temperature=-0.5)
    # A run trains on the sampled log-probs: it needs a temperature above 0.
    with pytest.raises(BadInputError, match=r"--temperature must be > 0 for GRPO \(the loss divides by it\)"):
        GRPOConfig(temperature=0.0)
