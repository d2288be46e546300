"""Scoring: rewards + group advantages for rollout records, the library half of `mllmjax score`.

`score_records(records, ScoreConfig(...)) -> (scored records, summary)` is the one function the CLI and
the grpo loop call.

Design decisions:
- Groups are checked complete before any reward runs (`records.group_records`), so a bad file fails in
  a second, not after minutes of scoring.
- Parallelism uses processes, not threads: math-verify's time limit is `signal.alarm`, which only works
  in a process's main thread. Workers come from a `forkserver` context that preloads math-verify and this
  package: the server process is started fresh (no JAX runtime threads inherited, unlike `fork` from a
  parent that has initialised JAX) and each worker then forks from it cheaply (unlike `spawn`, which
  re-imports everything per worker). `workers=0` scores in this process, which is the fastest choice
  for small inputs (a worker pool costs more than it saves on a 2-core machine; workers pay off on
  machines with idle cores); when called off the main thread it switches to one worker process by
  itself. A script that asks for workers needs the usual `if __name__ == "__main__":` guard (forkserver
  re-imports __main__).
- Workers receive only (completion, answer) unless a reward other than the built-ins is configured, in
  which case they also receive the record's JSON object (the documented reward signature).
- Overlong completions (finish_reason "length"): `none` leaves them alone; `penalty` adds a reward named
  "overlong" worth -overlong_penalty (0 for the others) to the weighted sum, before advantages;
  `mask` computes advantages over the full group as usual, then sets the truncated ones to 0, so they
  carry no policy-gradient signal (the DAPO "overlong filtering" choice: the group baseline still sees
  them). The trainer can identify them by finish_reason.
- `soft:L_MAX,L_CACHE` is DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476), by
  length rather than by finish_reason: a completion of n tokens gets the "overlong" reward
  -overlong_penalty * min(1, max(0, n - (L_MAX - L_CACHE)) / L_CACHE): 0 up to L_MAX - L_CACHE tokens,
  then linear down to -overlong_penalty at L_MAX (and beyond). overlong_penalty 1 is DAPO's.
- Zero-variance groups (all task rewards exactly equal: the weighted rewards before the overlong term,
  which shapes length and is no answer signal, as DAPO's dynamic sampling filters on accuracy) are
  counted as `frac_reward_zero_std`; with `filter_zero_variance` their records are dropped from the
  output (whole groups only).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from mllmjax import rewards as rewards_lib
from mllmjax.advantages import SINGLE_SAMPLE, AllGather, compute_advantages, get_estimator, zero_variance
from mllmjax.errors import BadInputError, RuntimeFailure
from mllmjax.records import CONTINUATION_KEY, RolloutRecord, group_records
from mllmjax.rewards import (
    DEFAULT_CORRECT_TIMEOUT_S,
    RewardFn,
    RewardOutcome,
    evaluate_rewards,
    parse_reward_weights,
    resolve_rewards,
)
from mllmjax.settings import DEFAULTS, Settings

OVERLONG_MODES = ("none", "mask", "penalty")  # and soft:L_MAX,L_CACHE (`parse_soft_overlong`)
OVERLONG_REWARD = "overlong"


def parse_soft_overlong(spec: str, max_new_tokens: int | None = None) -> tuple[int, int] | None:
    """(L_MAX, L_CACHE) of an `--overlong soft:L_MAX,L_CACHE` spec; None for the other modes.

    `soft:L_CACHE` takes L_MAX = max_new_tokens where the sampler's limit is known (grpo)."""
    if not spec.startswith("soft:"):
        return None
    parts = spec[len("soft:") :].split(",")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1 and max_new_tokens is not None:
        numbers = [max_new_tokens, numbers[0]]
    if len(numbers) != 2:
        known = " (or soft:L_CACHE, with L_MAX = --max-new-tokens)" if max_new_tokens is not None else ""
        raise BadInputError(f"--overlong {spec!r}: expected soft:L_MAX,L_CACHE in tokens{known}")
    l_max, l_cache = numbers
    if not 0 < l_cache <= l_max:
        raise BadInputError(
            f"--overlong {spec!r}: need 0 < L_CACHE <= L_MAX, got L_MAX={l_max}, L_CACHE={l_cache}"
        )
    return l_max, l_cache


def soft_overlong(lengths: np.ndarray, l_max: int, l_cache: int) -> np.ndarray:
    """DAPO's soft overlong punishment in [-1, 0] for completions of `lengths` tokens."""
    over = np.maximum(np.asarray(lengths, np.float64) - (l_max - l_cache), 0.0)
    return 0.0 - np.minimum(over / l_cache, 1.0)  # 0.0, not -0.0, below the cache


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """What `score` does. `rewards` is a weight spec like "correct=1.0,format=0.5,tags=0.5" (custom
    rewards as `package.module:function=w` items or in `reward_fns`)."""

    rewards: str = DEFAULTS.reward
    reward_fns: tuple[str, ...] = DEFAULTS.reward_fn
    advantage: str = DEFAULTS.advantage
    filter_zero_variance: bool = False
    # none, mask, penalty, or soft:L_MAX,L_CACHE
    overlong: str = DEFAULTS.overlong
    overlong_penalty: float = DEFAULTS.overlong_penalty
    workers: int = 0
    correct_timeout_s: int = DEFAULT_CORRECT_TIMEOUT_S
    # Seconds each custom reward call may run (None: no limit).
    reward_timeout_s: float | None = DEFAULTS.reward_timeout
    group_size: int | None = None
    all_gather: AllGather | None = None
    source: str = "records"

    def __post_init__(self) -> None:
        get_estimator(self.advantage)
        # A soft:... spec is parsed here (and refused with its own message), whatever its numbers say.
        if not isinstance(self.overlong, str) or (
            self.overlong not in OVERLONG_MODES and parse_soft_overlong(self.overlong) is None
        ):
            raise BadInputError(
                f"--overlong must be one of {', '.join(OVERLONG_MODES)} or soft:L_MAX,L_CACHE, "
                f"got {self.overlong!r}"
            )
        if not (isinstance(self.overlong_penalty, int | float) and self.overlong_penalty >= 0):
            raise BadInputError(f"the overlong penalty must be a number >= 0, got {self.overlong_penalty!r}")
        if type(self.workers) is not int or self.workers < 0:
            raise BadInputError(
                f"--workers must be an integer >= 0 (0 = in this process), got {self.workers!r}"
            )
        if type(self.correct_timeout_s) is not int or self.correct_timeout_s < 1:
            raise BadInputError(
                f"the correct-reward time limit must be whole seconds >= 1, got {self.correct_timeout_s!r}"
            )
        rewards_lib.check_custom_timeout(self.reward_timeout_s)
        least = 1 if self.advantage in SINGLE_SAMPLE else 2
        if self.group_size is not None and (type(self.group_size) is not int or self.group_size < least):
            raise BadInputError(f"group size G must be an integer >= {least}, got {self.group_size!r}")
        names = [
            name for name, _, _ in self.resolved_rewards()
        ]  # unknown names fail before any input is read
        if self.overlong != "none" and self.overlong != "mask" and OVERLONG_REWARD in names:
            raise BadInputError(
                f"--overlong {self.overlong} adds a reward named {OVERLONG_REWARD!r}; rename the custom one"
            )

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> ScoreConfig:
        """The score settings of `settings` (reward, reward_fn, advantage, overlong, overlong_penalty);
        `kwargs` sets the others (filter_zero_variance, workers, group_size, source, ...) or overrides."""
        own = dict(
            rewards=settings.reward,
            reward_fns=tuple(settings.reward_fn),
            advantage=settings.advantage,
            overlong=settings.overlong,
            overlong_penalty=settings.overlong_penalty,
            reward_timeout_s=settings.reward_timeout,
        )
        return cls(**{**own, **kwargs})

    def weights(self) -> tuple[tuple[str, float], ...]:
        items = parse_reward_weights(self.rewards)
        for spec in self.reward_fns:
            items += parse_reward_weights(spec)
        return items

    def resolved_rewards(self) -> tuple[tuple[str, RewardFn, float], ...]:
        return resolve_rewards(self.weights())


# ------------------------------------------------------------------------------------------ workers

_worker_rewards: tuple[tuple[str, RewardFn, float], ...] = ()


def _init_worker(
    resolved: tuple[tuple[str, RewardFn, float], ...], timeout_s: int, custom_timeout_s: float | None
) -> None:
    global _worker_rewards
    _worker_rewards = resolved
    rewards_lib.set_correct_timeout(timeout_s)
    rewards_lib.set_custom_timeout(custom_timeout_s)


def _score_items(items: list[tuple[str, str, dict[str, Any] | None]]) -> list[RewardOutcome]:
    return [evaluate_rewards(_worker_rewards, c, a, rec or {}) for c, a, rec in items]


def _pool_context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["math_verify", "mllmjax.rewards", "mllmjax.scoring"])
    return ctx


def scored_text(record: RolloutRecord) -> str:
    """The text rewards judge: the completion, after the partial completion it continues when it is a
    continuation (meta["replay"]["prefix"], from grpo's replay buffer: the answer may lie in either)."""
    replay = record.meta.get(CONTINUATION_KEY)
    if isinstance(replay, dict) and isinstance(replay.get("prefix"), str):
        return replay["prefix"] + record.completion
    return record.completion


def _evaluate_all(
    records: Sequence[RolloutRecord],
    resolved: tuple[tuple[str, RewardFn, float], ...],
    *,
    workers: int,
    timeout_s: int,
    custom_timeout_s: float | None = None,
) -> list[RewardOutcome]:
    needs_record = any(fn not in rewards_lib.BUILTIN_FNS for _, fn, _ in resolved)
    items = [(scored_text(r), r.answer, r.to_dict() if needs_record else None) for r in records]
    if workers == 0 and threading.current_thread() is not threading.main_thread():
        workers = 1  # math-verify's signal.alarm time limit needs a main thread: use a process's
    if workers == 0:
        previous = rewards_lib._correct_timeout_s, rewards_lib._custom_timeout_s
        rewards_lib.set_correct_timeout(timeout_s)
        rewards_lib.set_custom_timeout(custom_timeout_s)
        try:
            global _worker_rewards
            saved, _worker_rewards = _worker_rewards, resolved
            try:
                return _score_items(items)
            finally:
                _worker_rewards = saved
        finally:
            rewards_lib.set_correct_timeout(previous[0])
            rewards_lib.set_custom_timeout(previous[1])
    chunksize = max(1, min(256, len(items) // (workers * 4) or 1))
    try:
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        # concurrent.futures rather than multiprocessing.Pool: a worker that dies (OOM, segfault in a
        # custom reward) raises BrokenProcessPool here instead of hanging the run forever.
        with ProcessPoolExecutor(
            workers,
            mp_context=_pool_context(),
            initializer=_init_worker,
            initargs=(resolved, timeout_s, custom_timeout_s),
        ) as pool:
            return [outcome for chunk in pool.map(_score_items, chunks) for outcome in chunk]
    except (OSError, EOFError, BrokenProcessPool) as e:
        raise RuntimeFailure(f"reward worker processes failed: {e}") from e


# ------------------------------------------------------------------------------------------ scoring


def reward_outcomes(records: Sequence[RolloutRecord], config: ScoreConfig) -> list[RewardOutcome]:
    """Every reward of every record (values and errors), in record order: the expensive half of
    scoring, which a multi-host run does per host on its own records before gathering them."""
    resolved = config.resolved_rewards()
    return _evaluate_all(
        records, resolved, workers=config.workers, timeout_s=config.correct_timeout_s,
        custom_timeout_s=config.reward_timeout_s,
    )  # fmt: skip


def score_records(
    records: Sequence[RolloutRecord],
    config: ScoreConfig,
    *,
    outcomes: Sequence[RewardOutcome] | None = None,
) -> tuple[list[RolloutRecord], dict[str, Any]]:
    """Add rewards, the weighted reward and group advantages to complete groups of rollout records.

    Returns the scored records (input order; zero-variance groups dropped when configured) and a
    summary dict (JSON-serialisable; see `summary keys` in the CLI help). `outcomes`: the records'
    `reward_outcomes` if already computed (e.g. per host, then gathered); else they are computed here.
    """
    started = time.perf_counter()
    groups = group_records(records, group_size=config.group_size, source=config.source)
    if groups.group_size < 2 and config.advantage not in SINGLE_SAMPLE:
        raise BadInputError(
            f"{config.source}: group size G must be >= 2 for group advantages, got G={groups.group_size} "
            "(sample several completions per prompt: -G/--group-size)"
        )
    resolved = config.resolved_rewards()
    if outcomes is None:
        outcomes = reward_outcomes(records, config)
    elif len(outcomes) != len(records):
        raise ValueError(f"{len(outcomes)} reward outcomes for {len(records)} records")
    outcomes = list(outcomes)

    n = len(records)
    names = [name for name, _, _ in resolved]
    values = {name: np.array([o.values[name] for o in outcomes], dtype=np.float64) for name in names}
    truncated = np.array([r.finish_reason == "length" for r in records])
    total = np.zeros(n, dtype=np.float64)
    for name, _, weight in resolved:
        total += weight * values[name]
    task = total.copy()  # the rewards' signal, before the length shaping below
    soft = parse_soft_overlong(config.overlong)
    if config.overlong == "penalty":
        values[OVERLONG_REWARD] = np.where(truncated, -float(config.overlong_penalty), 0.0)
        total += values[OVERLONG_REWARD]
    elif soft is not None:
        lengths = np.array([len(r.completion_ids) for r in records])
        values[OVERLONG_REWARD] = float(config.overlong_penalty) * soft_overlong(lengths, *soft)
        total += values[OVERLONG_REWARD]

    index = np.array(groups.index)  # [groups, G] positions into records
    grouped = total[index]
    advantages_2d = compute_advantages(grouped, config.advantage, all_gather=config.all_gather)
    advantage = np.empty(n, dtype=np.float64)
    advantage[index.reshape(-1)] = advantages_2d.reshape(-1)
    if config.overlong == "mask":
        advantage = np.where(truncated, 0.0, advantage)
    # A group is zero-variance when its task rewards are all equal: the overlong term is length shaping,
    # not signal (DAPO filters on accuracy), so an all-wrong group that differs only in length counts.
    # One sample per prompt (reinforce) has no group whose rewards could vary: none is zero-variance.
    zero_std = zero_variance(task[index]) if groups.group_size > 1 else np.zeros(len(grouped), bool)
    keep = np.ones(n, dtype=bool)
    if config.filter_zero_variance:
        keep[index[zero_std].reshape(-1)] = False

    reward_names = list(values)
    scored = [
        record.with_scores(
            rewards={name: float(values[name][i]) for name in reward_names},
            reward=float(total[i]),
            advantage=float(advantage[i]),
            reward_errors=dict(outcomes[i].errors),
        )
        for i, record in enumerate(records)
        if keep[i]
    ]
    elapsed = time.perf_counter() - started
    summary = _summary(
        records=records,
        config=config,
        resolved=resolved,
        values=values,
        total=total,
        advantage=advantage,
        keep=keep,
        truncated=truncated,
        zero_std=zero_std,
        outcomes=outcomes,
        group_size=groups.group_size,
        elapsed=elapsed,
    )
    return scored, summary


def _stats(x: np.ndarray) -> dict[str, float | None]:
    if x.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


def _summary(
    *,
    records: Sequence[RolloutRecord],
    config: ScoreConfig,
    resolved: tuple[tuple[str, RewardFn, float], ...],
    values: dict[str, np.ndarray],
    total: np.ndarray,
    advantage: np.ndarray,
    keep: np.ndarray,
    truncated: np.ndarray,
    zero_std: np.ndarray,
    outcomes: list[RewardOutcome],
    group_size: int,
    elapsed: float,
) -> dict[str, Any]:
    lengths = np.array([len(r.completion_ids) for r in records], dtype=np.float64)
    errors_by_name: dict[str, int] = {}
    first_error: dict[str, str] = {}
    for outcome in outcomes:
        for name, message in outcome.errors.items():
            errors_by_name[name] = errors_by_name.get(name, 0) + 1
            first_error.setdefault(name, message)
    length_stats: dict[str, Any] = {**_stats(lengths), "p50": float(np.median(lengths))}
    accuracy = None
    if "correct" in values:
        right = values["correct"] == 1.0
        accuracy = float(right.mean())
        length_stats["mean_correct"] = float(lengths[right].mean()) if right.any() else None
        length_stats["mean_incorrect"] = float(lengths[~right].mean()) if (~right).any() else None
    n = len(records)
    return {
        "source": config.source,
        "records": n,
        "groups": int(zero_std.size),
        "group_size": group_size,
        "records_written": int(keep.sum()),
        "groups_dropped": int(zero_std.sum()) if config.filter_zero_variance else 0,
        "reward_weights": {name: weight for name, _, weight in resolved},
        "rewards_mean": {name: float(v.mean()) for name, v in values.items()},
        "reward": _stats(total),
        "accuracy": accuracy,
        "frac_reward_zero_std": float(zero_std.mean()),
        "advantage_estimator": config.advantage,
        "advantage": _stats(advantage[keep]),
        "completion_tokens": length_stats,
        "truncation_rate": float(truncated.mean()),
        "overlong": config.overlong,
        "reward_errors": sum(errors_by_name.values()),
        "reward_errors_by_name": errors_by_name,
        "reward_error_examples": first_error,
        "seconds": elapsed,
        "completions_per_s": n / elapsed if elapsed > 0 else None,
        "workers": config.workers,
    }
