"""The stages of one GRPO step, as functions of the run's context and state: sample and score (with
dynamic sampling), train, evaluate. They call the same library functions as the single commands."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mllmjax.grpo import faults
from mllmjax.grpo.replay import ReplayBuffer, StepMode, continuation, step_candidates

if TYPE_CHECKING:
    from mllmjax.grpo.context import RunContext

Emit = Callable[[str, dict[str, Any]], None]


def problem_index(cursor: int, n: int, seed: int) -> int:
    """The dataset index of the cursor-th prompt of a run: epochs of seeded permutations."""
    epoch, pos = divmod(cursor, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[pos])


def derived_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (the sampler's seed for a step and sampling round)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def train_rng(seed: int) -> Any:
    """The trainer's initial RNG key data (minibatch shuffling), a function of the run's seed."""
    import jax

    return jax.random.key_data(jax.random.key(derived_seed(seed, 1)))


def collect_rollouts(
    ctx: RunContext,
    params: Any,
    step: int,
    cursor: int,
    emit: Emit,
    *,
    mode: StepMode | None = None,
    replay: ReplayBuffer | None = None,
) -> tuple[list[Any], dict[str, Any], dict[str, Any], int, ReplayBuffer | None]:
    """Sample and score until the step's batch is full (more rounds only with dynamic sampling).

    `mode` (`replay.step_mode`): prompts x completions and the estimator (default: the config's).
    `replay`: the replay buffer, used when --replay-prob > 0: prompts are replaced by continuations
    drawn from it, and the step's fresh groups add partial completions to it.
    Returns (scored records, score summary, counters, the cursor after the data prompts consumed, the
    replay buffer after the step)."""
    from mllmjax.rollout import gather_records
    from mllmjax.scoring import reward_outcomes, score_records

    cfg = ctx.cfg
    if mode is None:
        mode = StepMode(cfg.advantage, cfg.group_size, cfg.prompts_per_step)
    wanted = mode.prompts * mode.group_size
    kept: list[Any] = []
    summaries: list[dict[str, Any]] = []
    all_records: list[Any] = []
    rollout_s = score_s = 0.0
    rounds = groups_sampled = replayed = 0
    fresh: dict[int, int] = {}  # group -> the data problem it was sampled from (not a continuation)
    score_cfg = cfg.score_config()
    if mode.switched:  # one completion per prompt: a batch-wide estimator, nothing to filter
        score_cfg = dataclasses.replace(
            score_cfg, advantage=mode.estimator, group_size=1, filter_zero_variance=False
        )
    use_replay = replay is not None and cfg.replay_prob > 0
    dynamic = cfg.dynamic_sampling and not mode.switched
    while len(kept) < wanted and rounds < cfg.max_sampling_rounds:
        count = mode.prompts - len(kept) // mode.group_size
        if dynamic:  # over-samples to a full decode batch
            count = cfg.round_groups(count, mode.group_size)
        n = len(ctx.problems)
        if use_replay:
            rng = np.random.default_rng([cfg.seed, 4, step, rounds])
            slots, replay = replay.draw(count, cfg.replay_prob, rng)  # type: ignore[union-attr]
        else:
            slots = [None] * count
        problems = []
        for i, entry in enumerate(slots):
            if entry is None:  # a fresh prompt: the next one of the data order
                index = problem_index(cursor, n, cfg.seed)
                cursor += 1
                fresh[groups_sampled + i] = index
                problems.append(ctx.problems[index])
            else:
                replayed += 1
                problems.append(continuation(ctx.problems[entry.problem], entry))
        t0 = time.perf_counter()
        emit("phase", {"phase": "rollout", "round": rounds})
        # This host's share: sampled on its devices, rewards scored here, then every host's joined.
        mine = ctx.rollouts(
            params, problems,
            cfg.rollout_config(seed=derived_seed(cfg.seed, 2, step, rounds), group_size=mode.group_size),
            policy=f"{ctx.run_dir.path}@{step - 1}", first_group=groups_sampled,
            meta={"step": step, "round": rounds},
            on_batch=lambda tokens, samples: emit("rollout_progress", {"tokens": tokens, "samples": samples}),
        )  # fmt: skip
        t1 = time.perf_counter()
        emit("phase", {"phase": "score"})
        pairs = gather_records(list(zip(mine, reward_outcomes(mine, score_cfg), strict=True)))
        records = [record for record, _ in pairs]
        scored, summary = score_records(records, score_cfg, outcomes=[o for _, o in pairs])
        rollout_s += t1 - t0
        score_s += time.perf_counter() - t1
        kept.extend(scored)
        summaries.append(summary)
        all_records.extend(records)
        groups_sampled += len(problems)
        rounds += 1
        if not dynamic:
            break
    kept = kept[:wanted]
    counters: dict[str, Any] = {
        "rollout_s": rollout_s, "score_s": score_s, "sampling_rounds": rounds,
        "prompts_sampled": groups_sampled, "groups_trained": len(kept) // mode.group_size,
        "completion_tokens": sum(len(r.completion_ids) for r in all_records),
    }  # fmt: skip
    if use_replay:
        rng = np.random.default_rng([cfg.seed, 5, step])
        candidates = step_candidates(all_records, fresh, rng, avoid=ctx.image_token_ids())
        replay = replay.add(candidates, step, rng)  # type: ignore[union-attr]
        counters["replayed"] = replayed
        counters["replay_buffer"] = len(replay.entries)  # type: ignore[union-attr]
    return kept, merge_summaries(summaries), counters, cursor, replay


PROBE_PROMPTS = 8  # most prompts the probe samples (in one decode batch, G completions each)


def probe_signal(ctx: RunContext, params: Any, emit: Emit) -> dict[str, Any]:
    """Sample the run's first prompts (up to PROBE_PROMPTS, as many as one --batch-size decode holds)
    with the starting parameters and score them: whether any group's rewards differ, i.e. whether GRPO
    has anything to learn from. The run is unchanged: no data is consumed, no state touched (the
    sampler's seed is the probe's own). Returns the counts, the rewards and a one-line report that,
    when no group has signal, says why it may be and what to try."""
    from mllmjax.rollout import gather_records
    from mllmjax.scoring import reward_outcomes, score_records

    cfg = ctx.cfg
    n = len(ctx.problems)
    count = min(n, PROBE_PROMPTS, max(1, cfg.batch_size // cfg.group_size))
    problems = [ctx.problems[problem_index(i, n, cfg.seed)] for i in range(count)]
    score_cfg = dataclasses.replace(cfg.score_config(), filter_zero_variance=False)
    t0 = time.perf_counter()
    emit("phase", {"phase": "probe"})
    mine = ctx.rollouts(
        params, problems, cfg.rollout_config(seed=derived_seed(cfg.seed, 7)), policy=f"{ctx.run_dir.path}@0",
        meta={"probe": True},
    )  # fmt: skip
    pairs = gather_records(list(zip(mine, reward_outcomes(mine, score_cfg), strict=True)))
    _, summary = score_records([r for r, _ in pairs], score_cfg, outcomes=[o for _, o in pairs])
    groups = summary["groups"]
    signal = groups - round(summary["frac_reward_zero_std"] * groups)
    reward = summary["reward"]
    means = ", ".join(f"{k} {v:.2f}" for k, v in summary["rewards_mean"].items())
    line = (
        f"probe: {count} prompts x {cfg.group_size} completions of {cfg.data} in "
        f"{time.perf_counter() - t0:.0f}s: {signal} of {groups} groups with differing rewards; mean reward "
        f"{reward['mean']:.2f} ({means})"
    )
    if signal == 0:
        line = "warning: " + line + "; " + no_signal_advice(cfg, summary)
    elif summary["rewards_mean"].get("correct") == 0.0:
        line += "; no completion was correct, so the signal is the other rewards' alone for now"
    return {"prompts": count, "groups": groups, "groups_with_signal": signal, "reward_mean": reward["mean"],
            "rewards_mean": summary["rewards_mean"], "truncation_rate": summary["truncation_rate"],
            "line": line}  # fmt: skip


def no_signal_advice(cfg: Any, summary: dict[str, Any]) -> str:
    """What to try when the probe found no group whose rewards differ (every group's completions scored
    the same), from what the probe saw."""
    if summary["rewards_mean"].get("correct") == 1.0:
        return "every completion is already correct, so GRPO learns nothing: try a harder task"
    advice = ["GRPO learns nothing from groups whose completions all score the same"]
    if summary["truncation_rate"] >= 0.5:
        advice.append(
            f"{summary['truncation_rate']:.0%} of completions were cut at --max-new-tokens "
            f"{cfg.max_new_tokens}: raise it"
        )
    names = summary["rewards_mean"]
    if "format" not in names or "tags" not in names:
        advice.append("add a reward that gives early signal (--reward correct=1.0,format=0.5,tags=0.5)")
    advice.append(
        "or start from a task the model can sometimes solve (--data builtin:arith:level=0); "
        "--no-probe skips this check"
    )
    return "; ".join(advice)


def train_on_records(
    ctx: RunContext, state: Any, step: int, records: list[Any], emit: Emit, *, into: Any = None
) -> tuple[Any, dict[str, Any]]:
    """The PPO epochs on the step's scored records; returns (new train state, the step's train metrics).
    `state` stays whole: the updates run on a copy, so an abandoned step can roll back to it. `into`:
    a spent train state of the same structure whose buffers the copy is written into (donated: it
    is gone once the updates start; without records it is left untouched); None: fresh buffers."""
    from mllmjax.grpo.vision import batch_pixels
    from mllmjax.training import batch_from_records, place_batch

    if not records:  # dynamic sampling found no group with signal: nothing to learn from
        return state, {"updates": int(state.step), "train_s": 0.0, "skipped": 1.0}
    emit("phase", {"phase": "train"})
    t0 = time.perf_counter()
    batch = batch_from_records(records, pad_id=ctx.pad_id)
    pixels = batch_pixels(ctx, records, step)  # a vision-language model's rows' images
    if pixels is not None:
        batch = batch.replace(pixels=pixels)
    batch = place_batch(batch, ctx.mesh)
    timings: dict[str, float] = {}

    def on_update(m: dict[str, float]) -> None:
        emit("update", m)
        faults.crash_point("update", step)

    # The updates are donated a copy of the state: each writes its new state into the buffers of the
    # one before (a fresh state per update would break up the kept malloc heap, see mllmjax.runtime).
    working = copy_state(state, into=into)
    state, history = ctx.trainer.train_on_batch(working, batch, on_update=on_update, timings=timings)
    row: dict[str, Any] = {"train_s": time.perf_counter() - t0}
    row["ref_logps_s"] = timings.get("ref_logps_s", 0.0)
    row["updates"] = int(state.step)
    row.update(update_metrics(history))
    row["train_tok_s"] = sum(h["tokens"] for h in history) / max(row["train_s"], 1e-9)
    return state, row


@functools.cache
def _copy_into() -> Callable[[Any, Any], Any]:
    import jax

    # keep_unused: the donated destination stays a parameter, so XLA writes the copy into its buffers.
    return jax.jit(lambda dst, src: src, donate_argnums=0, keep_unused=True)


def reuses_state_buffers() -> bool:
    """Whether the loop writes each step's working copy into the buffers of the state the step before
    started from (`copy_state`): on the kept CPU heap (`mllmjax.runtime.keeps_heap`). Elsewhere that
    spare state would only hold memory through the rollouts."""
    import jax

    from mllmjax.runtime import keeps_heap

    return keeps_heap() and jax.default_backend() == "cpu"


def copy_state(state: Any, *, into: Any = None) -> Any:
    """A copy of `state` with the same placement: in `into`'s buffers (donated), or in new ones.

    On the kept CPU heap (mllmjax.runtime) the loop passes the state the step before started from, so
    the train state lives in the same two sets of buffers all run long. A fresh copy per step took
    blocks out of the holes the last update's temporaries left, so the next update's temporaries
    went on top of the heap: it grew by ~0.6 GB a step, and the embedded default peaked at 7.7 GB
    instead of 5.2 GB (between steps over 5 GB of its heap were free blocks)."""
    import jax

    if into is None:
        return jax.tree.map(lambda x: x.copy(), state)
    return _copy_into()(into, state)


def update_metrics(history: Sequence[dict[str, float]]) -> dict[str, float]:
    """A step's metrics from its updates' (`Trainer.train_on_batch`): means of the losses (the entropy
    bonus's `entropy_loss` among them when it is on), KL, entropy,
    clip fractions (and `clip_frac`, their sum), ratio mean and gradient norm; the extremes of the ratio
    and of the sampler/trainer log-prob gap; the last learning rate."""
    row: dict[str, float] = {}
    means = ["loss", "policy_loss", "kl", "entropy", "clip_low", "clip_high", "ratio_mean", "grad_norm"]
    # MoE; sampler log-probs; --entropy-coef
    means += [k for k in ("router_aux", "logp_mismatch_mean", "entropy_loss") if k in history[0]]
    for key in means:
        row[key] = float(np.mean([h[key] for h in history]))
    row["clip_frac"] = row["clip_low"] + row["clip_high"]
    row["ratio_min"] = float(min(h["ratio_min"] for h in history))
    row["ratio_max"] = float(max(h["ratio_max"] for h in history))
    if "logp_mismatch_max" in history[0]:
        row["logp_mismatch_max"] = float(max(h["logp_mismatch_max"] for h in history))
    row["lr"] = history[-1]["lr"]
    return row


def evaluate(ctx: RunContext, params: Any, step: int, emit: Emit) -> dict[str, float]:
    """Greedy pass@1 on the held-out problems, as `eval/*` metrics."""
    from mllmjax.evaluation import summarize
    from mllmjax.rollout import gather_records

    cfg = ctx.cfg
    t0 = time.perf_counter()
    emit("phase", {"phase": "eval"})
    records = ctx.rollouts(
        params, ctx.eval_problems, cfg.rollout_config(seed=derived_seed(cfg.seed, 3), group_size=1, greedy=True),
        policy=f"{ctx.run_dir.path}@{step}",
    )  # fmt: skip
    result, _ = summarize(gather_records(records))
    return {"eval/accuracy": result.pass_at_1, "eval/format": result.format_rate,
            "eval/mean_tokens": result.mean_tokens, "eval/truncation_rate": result.truncation_rate,
            "eval/problems": float(result.problems), "eval_s": time.perf_counter() - t0}  # fmt: skip


def merge_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The score summary of the union of the rounds' records (dynamic sampling scores in rounds): means
    weighted by each round's records (correct / incorrect lengths by its correct / incorrect records),
    the reward's standard deviation pooled exactly, the zero-variance fraction weighted by groups."""
    if len(summaries) == 1:
        return summaries[0]
    n = np.array([s["records"] for s in summaries], np.float64)

    def avg(get: Callable[[dict[str, Any]], Any], weights: np.ndarray = n) -> float | None:
        vals, w = [get(s) for s in summaries], np.asarray(weights, np.float64)
        if any(v is None for v, wi in zip(vals, w, strict=True) if wi > 0) or not w.sum():
            return None
        return float(sum(wi * v for v, wi in zip(vals, w, strict=True) if wi > 0) / w.sum())

    merged = dict(summaries[-1])
    merged["records"] = int(n.sum())
    merged["groups"] = sum(s["groups"] for s in summaries)
    merged["rewards_mean"] = {
        k: avg(lambda s, k=k: s["rewards_mean"][k]) for k in summaries[0]["rewards_mean"]
    }
    mean = avg(lambda s: s["reward"]["mean"])
    second = avg(lambda s: s["reward"]["std"] ** 2 + s["reward"]["mean"] ** 2)  # E[r^2] of each round
    merged["reward"] = {"mean": mean, "std": float(np.sqrt(max(second - mean**2, 0.0)))}
    merged["accuracy"] = avg(lambda s: s["accuracy"])
    merged["frac_reward_zero_std"] = avg(
        lambda s: s["frac_reward_zero_std"], np.array([s["groups"] for s in summaries])
    )
    merged["truncation_rate"] = avg(lambda s: s["truncation_rate"])
    tokens: dict[str, Any] = {"mean": avg(lambda s: s["completion_tokens"]["mean"])}
    if merged["accuracy"] is not None:
        right = n * np.array([s["accuracy"] for s in summaries])
        tokens["mean_correct"] = avg(lambda s: s["completion_tokens"]["mean_correct"], right)
        tokens["mean_incorrect"] = avg(lambda s: s["completion_tokens"]["mean_incorrect"], n - right)
    merged["completion_tokens"] = tokens
    merged["reward_errors"] = sum(s["reward_errors"] for s in summaries)
    merged["seconds"] = sum(s["seconds"] for s in summaries)
    return merged


def summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """A score summary as flat metrics-row keys."""
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
