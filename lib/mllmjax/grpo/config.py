"""Every setting of a GRPO run (`GRPOConfig`), the shipped recipes and TOML/YAML config files."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllmjax.errors import BadInputError
from mllmjax.grpo.replay import parse_switch
from mllmjax.settings import DEFAULT_MESH, Settings, setting

if TYPE_CHECKING:
    from mllmjax.rollout import RolloutConfig
    from mllmjax.scoring import ScoreConfig
    from mllmjax.trainer import TrainConfig

RECIPES_DIR = Path(__file__).parent.parent / "recipes"
EMBEDDED_RECIPE = "embedded-default"
PER_GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(Settings):
    """Every setting of a run: the shared `Settings` plus the devices it runs on, validated as a whole.

    With neither a model nor data named, `build_config` starts from the embedded default recipe;
    otherwise from these defaults: GSM8K, G=16, 1 prompt per step, 2 PPO epochs, temperature 1, top-k 50,
    1024 new tokens, rewards correct/format/tags at 1/0.5/0.5, Lion at 1e-6, KL beta 0.04."""

    mesh: str = setting(
        DEFAULT_MESH,
        "Device mesh as axis=size pairs over (data, fsdp, expert, tensor); -1 takes the remaining "
        "devices. expert shards a mixture of experts' experts (elsewhere it splits the batch rows).",
    )
    # Rollouts on another sharding of the same devices (e.g. tensor-parallel decode); None = `mesh`.
    sample_mesh: str | None = setting(
        None,
        "Mesh for rollouts and eval over the same devices (default: --mesh), e.g. tensor=8 to decode "
        "tensor-parallel while training fsdp; the parameters are resharded in device memory before each "
        "rollout. Multi-host: each host decodes its share of the prompts on its own devices, so this "
        "describes one host's devices.",
    )
    dtype: str = setting(
        "auto",
        "Parameter dtype: float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on accelerators).",
    )
    image_field: str = setting(
        "images",
        "Data record field holding a prompt's images (a path or a list of paths, relative to the data "
        "file, or a datasets Image feature); read on a vision-language checkpoint.",
    )

    def __post_init__(self) -> None:
        positive = ("steps", "prompts_per_step", "group_size", "max_new_tokens", "batch_size",
                    "max_sampling_rounds", "save_every", "keep", "eval_num_prompts", "replay_size")  # fmt: skip
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
        if parse_switch(self.estimator_switch) is not None and self.advantage not in PER_GROUP_ESTIMATORS:
            raise BadInputError(
                f"--estimator-switch alternates a per-group estimator ({', '.join(PER_GROUP_ESTIMATORS)}) "
                f"with reinforce; --advantage {self.advantage} is not one"
            )
        p = self.replay_prob
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise BadInputError(f"--replay-prob must be a probability in [0, 1], got {p!r}")
        for r in self.report_to:
            if r not in ("tensorboard", "wandb"):
                raise BadInputError(f"unknown --report-to {r!r}; choose from tensorboard, wandb")
        # The stage configs validate the rest (reward names, optimizer, loss aggregation, ...).
        self.score_config()
        self.train_config()

    # ----------------------------------------------------------------------------- stage configs
    def rollout_config(
        self, *, seed: int, group_size: int | None = None, greedy: bool = False
    ) -> RolloutConfig:
        from mllmjax.rollout import RolloutConfig

        return RolloutConfig.from_settings(self, seed=seed, group_size=group_size, greedy=greedy)

    def score_config(self) -> ScoreConfig:
        from mllmjax.scoring import ScoreConfig, parse_soft_overlong

        overlong = self.overlong
        soft = parse_soft_overlong(overlong, self.max_new_tokens) if isinstance(overlong, str) else None
        if soft is not None:
            l_max, l_cache = soft
            if l_max - l_cache >= self.max_new_tokens:
                raise BadInputError(
                    f"--overlong {overlong}: completions stop at --max-new-tokens {self.max_new_tokens}, "
                    f"so the penalty, which starts after L_MAX - L_CACHE = {l_max - l_cache} tokens, never applies"
                )
            overlong = f"soft:{l_max},{l_cache}"
        return ScoreConfig.from_settings(
            self, filter_zero_variance=self.dynamic_sampling, group_size=self.group_size, source="rollouts",
            overlong=overlong,
        )  # fmt: skip

    def round_groups(self, wanted: int, group_size: int) -> int:
        """Groups one sampling round decodes while `wanted` groups (of `group_size`) are still missing.
        Dynamic sampling over-samples (DAPO): a round decodes at least as many groups as fill one
        --batch-size decode batch, since a fuller batch costs little more time than the groups still
        wanted; the step keeps the first groups with signal in data order and drops the rest."""
        if not self.dynamic_sampling:
            return wanted
        return max(wanted, self.batch_size // group_size, 1)

    def train_config(self) -> TrainConfig:
        from mllmjax.training import make_train_config

        return make_train_config(self)

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
        expected = _type_error(FIELD_TYPES.get(name, ""), value)
        if expected:
            raise BadInputError(f"{where}: setting {key!r} must be {expected}, got {value!r}")
        out[name] = value
    return out


# The value types a config file may give each setting, read from the fields' annotations.
FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(GRPOConfig)}
_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _type_error(annotation: str, value: Any) -> str | None:
    """What `value` should have been for a field annotated `annotation` (None when it fits or the
    annotation is not a simple one: the configs' own checks see those)."""
    options = [a.strip() for a in annotation.split("|")]
    if "None" in options and value is None:
        return None
    kinds = [a for a in options if a != "None"]
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    if kind == "tuple[str, ...]":
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        return None if ok else "a list of strings"
    if kind not in _SCALARS:
        return None
    if isinstance(value, bool) and kind != "bool":  # TOML true is not the number 1
        return _NAMES[kind]
    return None if isinstance(value, _SCALARS[kind]) else _NAMES[kind]


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
