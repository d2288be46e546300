"""The GRPO loop in one process: rollout -> score -> PPO epochs, step after step, in a run directory.

`GRPORun(cfg, run_dir).run()` is what `mllmjax grpo` calls. Each step calls the same library functions as
the single commands (`make_rollouts`, `score_records`, `batch_from_records` + `Trainer.train_on_batch`,
`write_checkpoint`), with the current parameters in memory: no disk round trip between the stages.

Run directory (DESIGN.md):

    RUN/config.json         every resolved setting (GRPOConfig), plus the resolved start checkpoint
    RUN/metrics.jsonl       one JSON object per step (rewards, accuracy, KL, entropy, clip fraction,
                            lengths, truncation, zero-variance fraction, times, tokens/s, eval/*)
    RUN/checkpoints/step_N/ checkpoint artifacts with opt_state/ (every --save-every steps and at the
                            end; the last --keep are kept)
    RUN/rollouts/step_N.jsonl  the scored records of each step (--save-rollouts)
    RUN/plots/*.png         reward, accuracy, KL, entropy and length curves, drawn when the run ends or stops

Design decisions:
- Exact resume. Everything a step consumes is a function of (seed, step) or is saved in the checkpoint:
  the prompts come from a cursor into a per-epoch permutation of the training split (seeded; the cursor
  is saved, since dynamic sampling consumes a variable number of prompts), the sampler's seed is derived
  from (seed, step, round), and the trainer's state (params, optimizer state, update count, RNG) is
  saved whole. So resuming from step_N and running to the end gives the same parameters as a run that
  was never stopped (tested bitwise-close after kill -9 at several points).
- Crash safety. Checkpoints are written atomically (temp dir + rename), so a directory named step_N is
  always whole; stale temp dirs are removed on resume. Old checkpoints are renamed away before they are
  deleted. metrics.jsonl is appended once per step and cut back to the resumed step on resume.
- Interrupts. `stop_requested()` is polled between steps (in a multi-host run, all processes stop
  when any one was asked to): the loop then saves a checkpoint and returns `stopped`. A
  KeyboardInterrupt inside a step abandons that step and saves the last finished one.
- The embedded default (SmolLM2-135M-Instruct on the built-in arithmetic task) is a recipe file like any
  other (`recipes/embedded-default.toml`), applied when neither a model nor data is named.
- Dynamic sampling (DAPO): groups whose rewards are all equal carry no signal; with `dynamic_sampling`
  the loop samples further prompts (up to `max_sampling_rounds` rounds) until `prompts_per_step` groups
  with signal are collected. Advantages are per group, so this needs a per-group estimator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import time
import tomllib
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mllmjax.errors import ArtifactError, BadInputError, OutputExistsError
from mllmjax.rewards import DEFAULT_REWARD_SPEC

RECIPES_DIR = Path(__file__).parent / "recipes"
EMBEDDED_RECIPE = "embedded-default"
PER_GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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


# ----------------------------------------------------------------------------------------- config files
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


# ----------------------------------------------------------------------------------------- model
def cache_dir() -> Path:
    return Path(os.environ.get("MLLMJAX_CACHE", Path.home() / ".cache" / "mllmjax"))


def resolve_model(spec: str, *, dtype: str = "auto", on_convert: Callable[[str], None] | None = None) -> Path:
    """A checkpoint directory for `spec`: the checkpoint itself, or the cached conversion of a hub id,
    HF folder/file, GGUF or embedded model (converted on first use; the conversion is atomic, so an
    interrupted one is redone)."""
    from mllmjax.checkpoint import META_FILE, resolve_dtype
    from mllmjax.convert import convert

    path = Path(spec).expanduser()
    if (path / META_FILE).is_file():
        return path
    key = str(path.resolve()) if path.exists() else spec
    if path.is_file():
        key += f":{path.stat().st_size}:{path.stat().st_mtime_ns}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name if path.exists() else spec).strip("_")[:60]
    dt = np.dtype(resolve_dtype(dtype)).name if dtype == "auto" else dtype
    digest = hashlib.sha256(f"{key}|{dt}".encode()).hexdigest()[:10]
    out = cache_dir() / "models" / f"{slug}-{dt}-{digest}"
    if not (out / META_FILE).is_file():
        if on_convert is not None:
            on_convert(str(out))
        convert(spec, out, dtype=dt, force=out.exists())
    return out


# ----------------------------------------------------------------------------------------- data order
def problem_index(cursor: int, n: int, seed: int) -> int:
    """The dataset index of the cursor-th prompt of a run: epochs of seeded permutations."""
    epoch, pos = divmod(cursor, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[pos])


def derived_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (the sampler's seed for a step and sampling round)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


# ----------------------------------------------------------------------------------------- run dir
def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a whole checkpoint in RUN/checkpoints (temp and trash dirs are never matched)."""
    from mllmjax.checkpoint import META_FILE

    root = run_dir / CHECKPOINTS
    steps = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / META_FILE).is_file() and (d / "opt_state").is_dir():
                steps.append(int(m.group(1)))
    return sorted(steps)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    f = run_dir / CONFIG_FILE
    if not f.is_file():
        raise ArtifactError(f"{run_dir} is not a grpo run directory (no {CONFIG_FILE})")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{f}: unreadable: {e}") from e
    if raw.get("format") != RUN_FORMAT:
        raise ArtifactError(f"{f}: format {raw.get('format')!r}, expected {RUN_FORMAT!r}")
    return raw


RUN_FORMAT = "mllmjax.grpo-run/1"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(run_dir: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl as dicts (a torn last line from a crash is skipped), optionally steps <= upto."""
    f = run_dir / METRICS_FILE
    rows = []
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and (upto is None or row.get("step", 0) <= upto):
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int  # the last finished step
    status: str  # "done", "stopped" (asked to stop between steps), "interrupted" (a step abandoned)
    checkpoint: Path | None
    metrics: list[dict[str, Any]]


Event = Callable[[str, dict[str, Any]], None]


class GRPORun:
    """One run directory. `run()` trains from the start or from its last checkpoint (resume=True)."""

    def __init__(self, cfg: GRPOConfig, run_dir: str | os.PathLike[str], *, resume: bool = False,
                 force: bool = False, on_event: Event | None = None):  # fmt: skip
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.force = force
        self.emit: Event = on_event or (lambda kind, data: None)
        if not resume and self.run_dir.exists() and any(self.run_dir.iterdir()) and not force:
            raise OutputExistsError(
                f"{self.run_dir} exists; pass --resume {self.run_dir} to continue it or --force to replace it"
            )
        if resume and not (self.run_dir / CONFIG_FILE).is_file():
            raise ArtifactError(f"{self.run_dir} is not a grpo run directory (no {CONFIG_FILE})")

    # ----------------------------------------------------------------------------- setup
    def _check_memory(self, start: Any, tcfg: Any) -> None:
        """Estimate the memory of a rollout and of one update (prompt length from the first 256
        problems), report both as 'memory' events, and stop before the optimizer state exists if
        either cannot fit."""
        import jax

        from mllmjax import memory
        from mllmjax.rollout import encode_prompt
        from mllmjax.sampling.sampler import MIN_NEW_BUCKET, bucket, decode_windows, prompt_bucket, unrolled
        from mllmjax.training import padded_shape

        cfg = self.cfg
        rcfg = cfg.rollout_config(seed=0)
        longest = max(len(encode_prompt(self.tokenizer, p, rcfg)[1]) for p in self.problems[:256])
        dtype = jax.tree.leaves(start.params)[0].dtype.name
        # Not donated: the updates take over a copy, and the state the step started from stays alive
        # beside it (to roll the step back), which is the "new state" of a non-donated update.
        widths = padded_shape(longest, cfg.max_new_tokens)
        update = memory.for_train_config(
            start.cfg, tcfg, rows=cfg.prompts_per_step * cfg.group_size // cfg.minibatches,
            seq_len=sum(widths), completion_len=widths[1], param_dtype=dtype, mesh=self.mesh,
        )  # fmt: skip
        # A rollout decodes up to batch-size rows (whole groups) while the train state, the KL reference
        # and, with --sample-mesh, a resharded copy of the parameters are alive.
        # Multi-host: a host decodes its share of the prompts.
        share = -(-cfg.prompts_per_step // jax.process_count())
        prompts = bucket(min(max(1, cfg.batch_size // cfg.group_size), share))
        decode = memory.estimate_sampling(
            start.cfg, rows=prompts * cfg.group_size, param_dtype=dtype, compute_dtype=cfg.compute_dtype,
            cache_len=decode_windows(
                prompt_bucket(longest), bucket(cfg.max_new_tokens, MIN_NEW_BUCKET)
            ),
            mesh=self.sample_mesh, out_major=unrolled(),
        )  # fmt: skip
        rollout = memory.MemoryEstimate(
            {
                "params": update.parts["params"],
                "optimizer": update.parts["optimizer"],
                "reference": update.parts["reference"],
                "sampling copy": decode.parts["params"] if self.sample_mesh is not self.mesh else 0,
                "decode_weights": decode.parts.get("decode_weights", 0),
                "kv_cache": decode.parts["kv_cache"],
                "logits": decode.parts["logits"],
            },
            update.available,
        )
        for name, estimate in (("rollout", rollout), ("update", update)):
            self.emit("memory", {"line": estimate.describe(name), "bytes": estimate.total})
        rollout.check("use a smaller --batch-size or --max-new-tokens, or more devices in --sample-mesh")
        update.check(memory.TRAIN_HINT)

    def _setup(self) -> None:
        import jax

        from mllmjax.checkpoint import META_FILE, load_checkpoint, resolve_dtype
        from mllmjax.data import load_problems
        from mllmjax.distributed import barrier, decode_mesh, is_primary
        from mllmjax.sharding import make_mesh
        from mllmjax.trainer import Trainer
        from mllmjax.training import restore_train_state

        cfg = self.cfg
        for name in cfg.report_to:  # a missing extra fails before anything is written
            REPORTERS[name].check()
        # Multi-host: every process runs the loop; each samples and scores its share of the prompts,
        # the scored records are gathered, and process 0 writes the run's files.
        self.primary = is_primary()
        if self.resume:
            saved = read_run_config(self.run_dir)
            self.start_ckpt = Path(saved["start_checkpoint"])
        else:
            if self.run_dir.exists() and self.force and self.primary:
                shutil.rmtree(self.run_dir)
            barrier("grpo:fresh-run-dir")
            if jax.process_count() > 1 and not (Path(cfg.model) / META_FILE).is_file():
                raise BadInputError(
                    f"a multi-host run needs --model to be a converted checkpoint on storage every host "
                    f"sees; run `mllmjax convert {cfg.model} -o DIR` once and pass --model DIR"
                )
            self.emit("phase", {"phase": "model"})
            self.start_ckpt = resolve_model(
                cfg.model, dtype=cfg.dtype, on_convert=lambda out: self.emit("convert", {"out": out})
            )
        self.mesh = make_mesh(cfg.mesh)
        if jax.process_count() > 1:  # each host decodes its share of the prompts on its own devices
            flag = "--sample-mesh" if cfg.sample_mesh else "--mesh"
            self.sample_mesh = decode_mesh(cfg.sample_mesh or cfg.mesh, flag)
        else:
            self.sample_mesh = make_mesh(cfg.sample_mesh) if cfg.sample_mesh else self.mesh
        dtype = resolve_dtype(cfg.dtype)
        # Problems first: a bad --data fails before the model is loaded.
        self.problems = load_problems(cfg.data, split=cfg.split, question_field=cfg.question_field,
                                      answer_field=cfg.answer_field)  # fmt: skip
        self.eval_problems = []
        if cfg.eval_every:
            self.eval_problems = load_problems(
                cfg.eval_data or cfg.data, split=cfg.eval_split, question_field=cfg.question_field,
                answer_field=cfg.answer_field, num=cfg.eval_num_prompts,
            )  # fmt: skip
        start = load_checkpoint(self.start_ckpt, mesh=self.mesh, dtype=dtype)
        self.model_cfg = start.cfg
        self.hf_config = start.hf_config
        self.tokenizer = start.tokenizer()
        self.stop_ids = start.stop_ids
        self.pad_id = self.tokenizer.pad_token_id or 0
        tcfg = cfg.train_config()
        self._check_memory(start, tcfg)
        self.trainer = Trainer(
            start.cfg, tcfg, ref_params=start.params if cfg.beta > 0 else None, donate=True, mesh=self.mesh
        )
        self.cursor = 0
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        if self.resume:
            steps = checkpoint_steps(self.run_dir)
            self._clean_partial()
            if steps:
                last = self.run_dir / CHECKPOINTS / f"step_{steps[-1]}"
                ckpt = load_checkpoint(last, mesh=self.mesh, dtype=dtype)
                self.state = restore_train_state(ckpt, self.trainer)
                grpo_meta = ckpt.meta.get("grpo", {})
                self.step = int(grpo_meta.get("step", steps[-1]))
                self.cursor = int(grpo_meta["cursor"])
            else:  # killed before the first checkpoint: start over in the same directory
                self.state = self.trainer.init_state(start.params, self._train_rng())
            self.metrics = read_metrics(self.run_dir, upto=self.step)
            if self.primary:
                _write_atomic(
                    self.run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in self.metrics)
                )
        else:
            if self.primary:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                config = {"format": RUN_FORMAT, **cfg.to_dict(), "start_checkpoint": str(self.start_ckpt),
                          "model_config": self.model_cfg.family, "devices": jax.device_count(),
                          "processes": jax.process_count()}  # fmt: skip
                _write_atomic(self.run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
                (self.run_dir / METRICS_FILE).touch()
            self.state = self.trainer.init_state(start.params, self._train_rng())
        barrier("grpo:setup")
        self.saved_step = self.step if self.resume else -1
        self.reporters = (
            [make_reporter(name, self.run_dir, cfg) for name in cfg.report_to] if self.primary else []
        )

    def _train_rng(self) -> Any:
        import jax

        return jax.random.key_data(jax.random.key(derived_seed(self.cfg.seed, 1)))

    def _clean_partial(self) -> None:
        root = self.run_dir / CHECKPOINTS
        if root.is_dir() and self.primary:
            for d in root.iterdir():
                if d.name.startswith("."):  # an interrupted write or delete
                    shutil.rmtree(d, ignore_errors=True)

    # ----------------------------------------------------------------------------- stages
    def _next_problems(self, count: int) -> list[Any]:
        n = len(self.problems)
        picked = [self.problems[problem_index(self.cursor + i, n, self.cfg.seed)] for i in range(count)]
        self.cursor += count
        return picked

    def _rollout(self, step: int) -> tuple[list[Any], dict[str, Any], dict[str, float]]:
        """Sample and score until the step's batch is full; returns (scored records, score summary of
        the last round, counters)."""
        from mllmjax.rollout import gather_records, host_rollouts
        from mllmjax.scoring import reward_outcomes, score_records

        cfg = self.cfg
        kept: list[Any] = []
        summaries: list[dict[str, Any]] = []
        all_records: list[Any] = []
        rollout_s = score_s = 0.0
        rounds = 0
        groups_sampled = 0
        while len(kept) < cfg.prompts_per_step * cfg.group_size and rounds < cfg.max_sampling_rounds:
            problems = self._next_problems(cfg.prompts_per_step - len(kept) // cfg.group_size)
            t0 = time.perf_counter()
            self.emit("phase", {"phase": "rollout", "round": rounds})
            # This host's share: sampled on its devices, rewards scored here, then every host's joined.
            mine = host_rollouts(
                self.state.params, self.model_cfg, self.tokenizer, problems,
                cfg.rollout_config(seed=derived_seed(cfg.seed, 2, step, rounds)),
                stop_ids=self.stop_ids, policy=f"{self.run_dir}@{step - 1}", first_group=groups_sampled,
                mesh=self.sample_mesh, compute_dtype=cfg.compute_dtype, meta={"step": step, "round": rounds},
                on_batch=lambda tokens, samples: self.emit("rollout_progress", {"tokens": tokens, "samples": samples}),
            )  # fmt: skip
            t1 = time.perf_counter()
            self.emit("phase", {"phase": "score"})
            score_cfg = cfg.score_config()
            pairs = gather_records(list(zip(mine, reward_outcomes(mine, score_cfg), strict=True)))
            records = [record for record, _ in pairs]
            scored, summary = score_records(records, score_cfg, outcomes=[o for _, o in pairs])
            t2 = time.perf_counter()
            rollout_s += t1 - t0
            score_s += t2 - t1
            kept.extend(scored)
            summaries.append(summary)
            all_records.extend(records)
            groups_sampled += len(problems)
            rounds += 1
            if not cfg.dynamic_sampling:
                break
        kept = kept[: cfg.prompts_per_step * cfg.group_size]
        counters = {"rollout_s": rollout_s, "score_s": score_s, "sampling_rounds": rounds,
                    "prompts_sampled": groups_sampled, "groups_trained": len(kept) // cfg.group_size,
                    "completion_tokens": sum(len(r.completion_ids) for r in all_records)}  # fmt: skip
        return kept, _merge_summaries(summaries), counters

    def _evaluate(self, step: int) -> dict[str, float]:
        from mllmjax.evaluation import summarize
        from mllmjax.rollout import gather_records, host_rollouts

        t0 = time.perf_counter()
        self.emit("phase", {"phase": "eval"})
        records = host_rollouts(
            self.state.params, self.model_cfg, self.tokenizer, self.eval_problems,
            self.cfg.rollout_config(seed=derived_seed(self.cfg.seed, 3), group_size=1, greedy=True),
            stop_ids=self.stop_ids, policy=f"{self.run_dir}@{step}", mesh=self.sample_mesh,
            compute_dtype=self.cfg.compute_dtype,
        )  # fmt: skip
        records = gather_records(records)
        result, _ = summarize(records)
        return {"eval/accuracy": result.pass_at_1, "eval/format": result.format_rate,
                "eval/mean_tokens": result.mean_tokens, "eval/truncation_rate": result.truncation_rate,
                "eval/problems": float(result.problems), "eval_s": time.perf_counter() - t0}  # fmt: skip

    def _save(self, step: int) -> Path:
        from mllmjax.checkpoint import copy_side_files, write_checkpoint
        from mllmjax.training import state_extras

        self.emit("phase", {"phase": "checkpoint"})
        out = self.run_dir / CHECKPOINTS / f"step_{step}"

        def side_files(d: Path) -> None:
            copy_side_files(self.start_ckpt, d)
            crash_point("checkpoint", step)

        write_checkpoint(
            out, params=self.state.params, hf_config=self.hf_config, write_tokenizer=side_files,
            source=str(self.start_ckpt), step=step, parent=str(self.start_ckpt), force=True,
            opt_state=state_extras(self.state),
            extra_meta={"reference": str(self.start_ckpt), "updates": int(self.state.step),
                        "grpo": {"run": str(self.run_dir), "step": step, "cursor": self.cursor}},
        )  # fmt: skip
        self.saved_step = step
        self._prune()
        return out

    def _prune(self) -> None:
        root = self.run_dir / CHECKPOINTS
        if not self.primary:
            return
        for old in checkpoint_steps(self.run_dir)[: -self.cfg.keep]:
            src = root / f"step_{old}"
            trash = root / f".trash-step_{old}-{uuid.uuid4().hex[:6]}"
            os.replace(src, trash)  # a whole step_N or none: never a half-deleted one
            shutil.rmtree(trash, ignore_errors=True)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        if not self.primary:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for r in self.reporters:
            r.log(row, int(row["step"]))

    # ----------------------------------------------------------------------------- run
    def run(self, stop_requested: Callable[[], bool] = lambda: False) -> RunResult:
        """Run steps until cfg.steps (or until stop_requested() between steps, or a KeyboardInterrupt
        inside one); a checkpoint of the last finished step is written before returning."""
        from mllmjax.distributed import any_process

        self._setup()
        cfg = self.cfg
        self.emit("start", {"step": self.step, "steps": cfg.steps, "resumed": self.resume,
                            "start_checkpoint": str(self.start_ckpt)})  # fmt: skip
        status = "done"
        # elapsed_s counts the run's own time: a resumed run goes on from the last recorded value.
        before = next((m["elapsed_s"] for m in reversed(self.metrics) if "elapsed_s" in m), 0.0)
        t_start = time.perf_counter() - before
        try:
            if cfg.eval_every and self.step == 0 and not any("eval/accuracy" in m for m in self.metrics):
                row = {"step": 0, **self._evaluate(0)}
                self._append_metrics(row)
                self.metrics.append(row)
                self.emit("eval", row)
            while self.step < cfg.steps:
                # Multi-host: a stop asked of any process stops them all after the same step.
                if any_process(stop_requested()):
                    status = "stopped"
                    break
                step = self.step + 1
                t0 = time.perf_counter()
                state_before, cursor_before = self.state, self.cursor
                try:
                    records, summary, counters = self._rollout(step)
                    crash_point("rollout", step)
                    row = self._train(step, records, summary, counters)
                    if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                        row.update(self._evaluate(step))
                    row["step_s"] = time.perf_counter() - t0
                    row["elapsed_s"] = time.perf_counter() - t_start
                    if cfg.save_rollouts:
                        from mllmjax.records import write_records

                        if self.primary:
                            (self.run_dir / "rollouts").mkdir(exist_ok=True)
                        write_records(records, self.run_dir / "rollouts" / f"step_{step}.jsonl", force=True)
                    self._append_metrics(row)
                except BaseException:
                    # The step is abandoned: back to the state and prompts it started from (a metrics line
                    # it may have written is cut on resume, which keeps steps <= the checkpoint's).
                    self.state, self.cursor = state_before, cursor_before
                    raise
                self.step = step
                self.metrics.append(row)
                crash_point("metrics", step)
                self.emit("step", row)
                if step % cfg.save_every == 0 or step == cfg.steps:
                    self._save(step)
        except KeyboardInterrupt:
            status = "interrupted"
            # Drop a metrics line the abandoned step may have written: the file matches the state.
            if self.primary:
                _write_atomic(
                    self.run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in self.metrics)
                )
        checkpoint = None
        if self.step > 0:
            if self.saved_step != self.step:
                checkpoint = self._save(self.step)
            else:
                checkpoint = self.run_dir / CHECKPOINTS / f"step_{self.step}"
        if self.metrics and self.primary:
            self.emit("phase", {"phase": "plots"})
            draw_plots(self.run_dir, self.metrics)
        for r in self.reporters:
            r.close()
        return RunResult(self.run_dir, self.step, status, checkpoint, self.metrics)

    def _train(
        self, step: int, records: list[Any], summary: dict[str, Any], counters: dict[str, float]
    ) -> dict[str, Any]:
        import jax

        from mllmjax.training import batch_from_records, place_batch

        row: dict[str, Any] = {"step": step}
        row.update(_summary_metrics(summary))
        row.update(counters)
        row["rollout_tok_s"] = counters["completion_tokens"] / max(counters["rollout_s"], 1e-9)
        if not records:  # dynamic sampling found no group with signal: nothing to learn from
            row.update({"updates": int(self.state.step), "train_s": 0.0, "skipped": 1.0})
            return row
        self.emit("phase", {"phase": "train"})
        t0 = time.perf_counter()
        batch = place_batch(batch_from_records(records, pad_id=self.pad_id), self.mesh)
        timings: dict[str, float] = {}

        def on_update(m: dict[str, float]) -> None:
            self.emit("update", m)
            crash_point("update", step)

        # The updates are donated a copy of the state: each writes its new state into the buffers of the
        # one before (no fresh state per update, which would also break up the kept malloc heap, see
        # mllmjax.runtime), and the state the step started from stays whole to roll the step back.
        working = jax.tree.map(lambda x: x.copy(), self.state)  # same placement, new buffers
        self.state, history = self.trainer.train_on_batch(
            working, batch, on_update=on_update, timings=timings
        )
        row["train_s"] = time.perf_counter() - t0
        row["ref_logps_s"] = timings.get("ref_logps_s", 0.0)
        row["updates"] = int(self.state.step)
        for key in (
            "loss",
            "policy_loss",
            "kl",
            "entropy",
            "clip_low",
            "clip_high",
            "ratio_mean",
            "grad_norm",
        ):
            row[key] = float(np.mean([h[key] for h in history]))
        row["clip_frac"] = row["clip_low"] + row["clip_high"]
        row["ratio_min"] = float(min(h["ratio_min"] for h in history))
        row["ratio_max"] = float(max(h["ratio_max"] for h in history))
        row["lr"] = history[-1]["lr"]
        train_tokens = sum(h["tokens"] for h in history)
        row["train_tok_s"] = train_tokens / max(row["train_s"], 1e-9)
        return row


def _merge_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Weighted means of the per-round score summaries (dynamic sampling scores in rounds)."""
    if len(summaries) == 1:
        return summaries[0]
    n = np.array([s["records"] for s in summaries], np.float64)
    w = n / n.sum()

    def avg(get: Callable[[dict[str, Any]], Any]) -> float | None:
        vals = [get(s) for s in summaries]
        if any(v is None for v in vals):
            return None
        return float(np.dot(w, vals))

    merged = dict(summaries[-1])
    merged["rewards_mean"] = {
        k: avg(lambda s, k=k: s["rewards_mean"][k]) for k in summaries[0]["rewards_mean"]
    }
    merged["reward"] = {"mean": avg(lambda s: s["reward"]["mean"]), "std": avg(lambda s: s["reward"]["std"])}
    merged["accuracy"] = avg(lambda s: s["accuracy"])
    merged["frac_reward_zero_std"] = float(
        sum(s["frac_reward_zero_std"] * s["groups"] for s in summaries) / sum(s["groups"] for s in summaries)
    )
    merged["truncation_rate"] = avg(lambda s: s["truncation_rate"])
    merged["completion_tokens"] = {"mean": avg(lambda s: s["completion_tokens"]["mean"])}
    merged["reward_errors"] = sum(s["reward_errors"] for s in summaries)
    merged["seconds"] = sum(s["seconds"] for s in summaries)
    return merged


def _summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {f"reward/{k}": v for k, v in summary["rewards_mean"].items()}
    row["reward"] = summary["reward"]["mean"]
    row["reward_std"] = summary["reward"]["std"]
    row["accuracy"] = summary["accuracy"]
    row["frac_reward_zero_std"] = summary["frac_reward_zero_std"]
    row["truncation_rate"] = summary["truncation_rate"]
    tokens = summary["completion_tokens"]
    row["completion_len"] = tokens["mean"]
    for key in ("mean_correct", "mean_incorrect"):
        if tokens.get(key) is not None:
            row[f"completion_len_{key.removeprefix('mean_')}"] = tokens[key]
    row["reward_errors"] = summary["reward_errors"]
    return row


# ----------------------------------------------------------------------------------------- crash points
def crash_point(name: str, step: int) -> None:
    """Fault injection for the kill tests: MLLMJAX_CRASH_AT=NAME@STEP kills this process with SIGKILL
    at that point (rollout, update, metrics, checkpoint: mid-write, before the rename)."""
    target = os.environ.get("MLLMJAX_CRASH_AT")
    if target and target == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------- plots
PLOTS = {
    "reward": ("reward", "reward (weighted mean)"),
    "accuracy": ("accuracy", "accuracy (train samples)"),
    "kl": ("kl", "KL to the reference"),
    "entropy": ("entropy", "entropy (nats / token)"),
    "length": ("completion_len", "completion length (tokens)"),
}


def draw_plots(run_dir: Path, metrics: Sequence[dict[str, Any]]) -> list[Path]:
    """PNG curves of reward, accuracy (with held-out eval accuracy when present), KL, entropy and length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, (key, title) in PLOTS.items():
        pts = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
        if name == "accuracy":
            ev = [(m["step"], m["eval/accuracy"]) for m in metrics if m.get("eval/accuracy") is not None]
            if ev:
                xs, ys = zip(*ev, strict=True)
                ax.plot(xs, ys, marker="o", label="held-out (greedy)")
            ax.legend(loc="best")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------- reporters
class _TensorBoard:
    @staticmethod
    def check() -> None:
        try:
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise BadInputError(
                "--report-to tensorboard needs the tensorboard package: pip install 'mllmjax[tensorboard]'"
            ) from e

    def __init__(self, run_dir: Path, cfg: GRPOConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any], step: int) -> None:
        for k, v in row.items():
            if isinstance(v, int | float) and k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    @staticmethod
    def check() -> None:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise BadInputError(
                "--report-to wandb needs the wandb package: pip install 'mllmjax[wandb]'"
            ) from e

    def __init__(self, run_dir: Path, cfg: GRPOConfig):
        import wandb

        self.run = wandb.init(project="mllmjax", name=run_dir.name, dir=str(run_dir), config=cfg.to_dict())

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)

    def close(self) -> None:
        self.run.finish()


REPORTERS: dict[str, Any] = {"tensorboard": _TensorBoard, "wandb": _WandB}


def make_reporter(name: str, run_dir: Path, cfg: GRPOConfig) -> Any:
    return REPORTERS[name](run_dir, cfg)
