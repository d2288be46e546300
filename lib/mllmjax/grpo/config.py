"""Every setting of a GRPO run (`GRPOConfig`), the shipped recipes and TOML/YAML config files."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from mllmjax.errors import BadInputError
from mllmjax.rewards import DEFAULT_REWARD_SPEC

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
EMBEDDED_RECIPE = "embedded-default"
PER_GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """Every setting of a run, flat, named like the CLI flags (with underscores). Defaults are the
    predecessor's GSM8K recipe with DESIGN.md's fixes."""

    # What to train and on what.
    model: str = "smollm2-135m"
    data: str = "gsm8k"
    split: str = "train"
    question_field: str | None = None
    answer_field: str | None = None
    system_prompt: str | None = None  # a file whose text replaces the built-in system prompt
    # The loop.
    steps: int = 400
    prompts_per_step: int = 1
    seed: int = 0
    # Rollout.
    group_size: int = 16
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    batch_size: int = 64
    # Score.
    reward: str = DEFAULT_REWARD_SPEC
    reward_fn: tuple[str, ...] = ()
    advantage: str = "grpo"
    overlong: str = "none"
    overlong_penalty: float = 1.0
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    # Train.
    ppo_epochs: int = 2
    minibatches: int = 1
    micro_batch: int | None = None
    lr: float = 1e-6
    optimizer: str = "lion"
    weight_decay: float = 1e-8
    warmup: float = 0.05
    beta: float = 0.04
    kl: str = "k3"
    clip_low: float = 0.2
    clip_high: float = 0.3
    loss_agg: str = "token"
    tis_cap: float | None = None
    remat: str = "none"
    layer_loop: str = "auto"
    compute_dtype: str | None = None
    attention: str = "auto"
    # Evaluation on a held-out split (greedy pass@1); 0 = off.
    eval_every: int = 0
    eval_data: str | None = None  # default: --data
    eval_split: str = "test"
    eval_num_prompts: int = 100
    # Run directory.
    save_every: int = 50
    keep: int = 3
    save_rollouts: bool = False
    report_to: tuple[str, ...] = ()
    mesh: str = "data=1,fsdp=-1,tensor=1"
    # Rollouts on another sharding of the same devices (e.g. tensor-parallel decode); None = `mesh`.
    sample_mesh: str | None = None
    dtype: str = "auto"

    def __post_init__(self) -> None:
        positive = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "batch_size",
                    "max_sampling_rounds", "save_every", "keep", "eval_num_prompts")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.eval_every < 0:
            raise BadInputError(f"--eval-every must be >= 0, got {self.eval_every!r}")
        if self.group_size < 2:
            raise BadInputError(f"--group-size must be >= 2 for group advantages, got {self.group_size}")
        if not self.temperature > 0:
            raise BadInputError(
                f"--temperature must be > 0 for GRPO (the loss divides by it), got {self.temperature}"
            )
        if self.dynamic_sampling and self.advantage not in PER_GROUP_ESTIMATORS:
            raise BadInputError(
                f"--dynamic-sampling assembles the batch from several sampling rounds, so it needs a per-group "
                f"advantage estimator ({', '.join(PER_GROUP_ESTIMATORS)}), not {self.advantage!r}"
            )
        for r in self.report_to:
            if r not in ("tensorboard", "wandb"):
                raise BadInputError(f"unknown --report-to {r!r}; choose from tensorboard, wandb")
        # The stage configs validate the rest (reward names, optimizer, loss aggregation, ...).
        self.score_config()
        self.train_config()

    # ----------------------------------------------------------------------------- stage configs
    def rollout_config(self, *, seed: int, group_size: int | None = None, greedy: bool = False) -> Any:
        from mllmjax.prompts import load_system_prompt
        from mllmjax.rollout import RolloutConfig
        from mllmjax.sampling.strategies import sampling_strategy_args

        strategy = sampling_strategy_args(self.temperature, greedy, self.top_k, self.top_p, self.min_p)
        return RolloutConfig(
            group_size=group_size or self.group_size,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
            max_batch=self.batch_size,
            system_prompt=load_system_prompt(self.system_prompt),
            **strategy,
        )

    def score_config(self) -> Any:
        from mllmjax.scoring import ScoreConfig

        return ScoreConfig(
            rewards=self.reward,
            reward_fns=tuple(self.reward_fn),
            advantage=self.advantage,
            filter_zero_variance=self.dynamic_sampling,
            overlong=self.overlong,  # type: ignore[arg-type]  # validated by ScoreConfig
            overlong_penalty=self.overlong_penalty,
            group_size=self.group_size,
            source="rollouts",
        )

    def train_config(self) -> Any:
        from mllmjax.training import make_train_config

        names = ("ppo_epochs", "minibatches", "micro_batch", "lr", "optimizer", "weight_decay", "warmup",
                 "steps", "beta", "kl", "clip_low", "clip_high", "loss_agg", "tis_cap", "remat", "temperature",
                 "compute_dtype", "attention", "layer_loop")  # fmt: skip
        return make_train_config(**{n: getattr(self, n) for n in names})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["reward_fn"] = list(self.reward_fn)
        d["report_to"] = list(self.report_to)
        return d


FIELDS = {f.name: f for f in dataclasses.fields(GRPOConfig)}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def read_config_file(spec: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings from a TOML or YAML file, or a shipped recipe by name (see `recipe_names()`). Keys are
    flag names (`max-new-tokens` or `max_new_tokens`); unknown keys are refused."""
    path = Path(spec)
    if not path.is_file():
        if str(spec) in recipe_names():
            path = RECIPES_DIR / f"{spec}.toml"
        else:
            raise BadInputError(
                f"config {spec!r} is neither a file nor a shipped recipe ({', '.join(recipe_names())})"
            )
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raise BadInputError(f"{path}: a config file must be .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise BadInputError(f"{path}: cannot parse: {' '.join(str(e).split())}") from e
    except Exception as e:  # yaml.YAMLError
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(f"{path}: cannot parse: {' '.join(str(e).split())}") from e
    if not isinstance(raw, dict):
        raise BadInputError(f"{path}: expected a table of settings, got {type(raw).__name__}")
    return normalise_settings(raw, where=str(path))


def normalise_settings(raw: dict[str, Any], *, where: str) -> dict[str, Any]:
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = [f for f in FIELDS if f.startswith(name[:4])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise BadInputError(f"{where}: unknown setting {key!r}{hint}")
        if name in ("reward_fn", "report_to") and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list):
            value = tuple(value)
        out[name] = value
    return out


def build_config(*layers: dict[str, Any]) -> GRPOConfig:
    """Merge settings, later layers winning: e.g. (recipe, config file, command-line flags). With no
    model and no data named in any layer, the embedded default recipe is the base."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    if "model" not in merged and "data" not in merged:
        merged = {**read_config_file(EMBEDDED_RECIPE), **merged}
    try:
        return GRPOConfig(**merged)
    except TypeError as e:
        raise BadInputError(f"bad setting: {e}") from e
