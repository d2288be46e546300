"""The step loop: rollout -> score -> train, step after step, with every hook called on each result."""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mllmjax.grpo import faults
from mllmjax.grpo.config import GRPOConfig
from mllmjax.grpo.context import RunContext, RunState, check_run_dir, open_run
from mllmjax.grpo.replay import parse_switch, step_mode
from mllmjax.grpo.report import Hook
from mllmjax.grpo.stages import (
    collect_rollouts,
    evaluate,
    probe_signal,
    reuses_state_buffers,
    summary_metrics,
    train_on_records,
)

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compiled = {"seconds": 0.0, "listening": False}


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling with JAX so far (from the
    jax.monitoring events; each step's share is its `compile_s`, which an ETA leaves out)."""
    if not _compiled["listening"]:
        import jax

        def listen(event: str, duration: float, **_: Any) -> None:
            if event in _COMPILE_EVENTS:
                _compiled["seconds"] += duration

        jax.monitoring.register_event_duration_secs_listener(listen)
        _compiled["listening"] = True
    return float(_compiled["seconds"])


def peak_rss_gb() -> float:
    """The process's peak resident memory so far, in GB (10^9 bytes): ru_maxrss is in KiB on Linux,
    bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e9, 3)


def is_embedded_default(cfg: GRPOConfig) -> bool:
    """Whether the run trains the embedded default's model on its data (its recipe is measured to
    learn, so `grpo` does not probe it)."""
    from mllmjax.grpo.config import EMBEDDED_RECIPE, RECIPES_DIR, read_config_file

    recipe = read_config_file(RECIPES_DIR / f"{EMBEDDED_RECIPE}.toml")
    return cfg.model == recipe["model"] and cfg.data == recipe["data"]


def system_seconds() -> float:
    """System CPU seconds of this process so far: mostly page faults, as the heap first grows to its
    peak; a step's share is its `sys_s`, which an ETA leaves out like compile time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    step: int  # the last finished step
    status: str  # "done", "stopped" (asked to stop between steps), "interrupted" (a step abandoned)
    checkpoint: Path | None
    metrics: list[dict[str, Any]]
    probe: dict[str, Any] | None = None  # `stages.probe_signal`'s finding, when this call ran the probe


class GRPORun:
    """One run directory. `run()` trains from the start or from its last checkpoint (resume=True);
    `hooks` (e.g. a live display) follow it beside the run's own reports (plots, --report-to)."""

    def __init__(self, cfg: GRPOConfig, run_dir: str | os.PathLike[str], *, resume: bool = False,
                 force: bool = False, hooks: Sequence[Hook] = ()):  # fmt: skip
        self.cfg = cfg
        self.path = Path(run_dir)
        self.resume = resume
        self.force = force
        self.hooks: tuple[Hook, ...] = tuple(hooks)  # the caller's; the run adds its reports
        self._listening = self.hooks
        # On the kept CPU heap each step's working copy of the train state is written into the
        # buffers of the state the step before started from (`stages.copy_state`).
        self._spare: Any = None
        self._updated = False
        self._reuse_buffers = False
        check_run_dir(self.path, resume=resume, force=force)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        for hook in self._listening:
            hook.on_event(kind, data)

    def _record(self, ctx: RunContext, state: RunState, row: dict[str, Any]) -> None:
        state.metrics.append(row)
        for hook in ctx.hooks:
            hook.on_metrics(row)

    def run(self, stop_requested: Callable[[], bool] = lambda: False) -> RunResult:
        """Run steps until cfg.steps (or until stop_requested() between steps, or a KeyboardInterrupt
        inside one); a checkpoint of the last finished step is written before returning."""
        from mllmjax.distributed import any_process

        ctx, state = open_run(self.cfg, self.path, resume=self.resume, force=self.force, hooks=self.hooks,
                              emit=self.emit)  # fmt: skip
        self._listening = ctx.hooks
        self._reuse_buffers = reuses_state_buffers()
        cfg = self.cfg
        self.emit("start", {"step": state.step, "steps": cfg.steps, "resumed": self.resume,
                            "start_checkpoint": str(ctx.start_checkpoint)})  # fmt: skip
        status = "done"
        probe = None
        # elapsed_s counts the run's own time: a resumed run goes on from the last recorded value.
        before = next((m["elapsed_s"] for m in reversed(state.metrics) if "elapsed_s" in m), 0.0)
        t_start = time.perf_counter() - before
        try:
            if cfg.eval_every and state.step == 0 and not any("eval/accuracy" in m for m in state.metrics):
                row = {"step": 0, **evaluate(ctx, ctx.policy(state.train.params), 0, self.emit)}
                ctx.run_dir.append_metrics(row)
                self._record(ctx, state, row)
            if cfg.probe and state.step == 0 and not is_embedded_default(cfg):
                probe = probe_signal(ctx, ctx.policy(state.train.params), self.emit)
                self.emit("probe", probe)
            while state.step < cfg.steps:
                # Multi-host: a stop asked of any process stops them all after the same step.
                if any_process(stop_requested()):
                    status = "stopped"
                    break
                self._step(ctx, state, t_start)
        except KeyboardInterrupt:
            status = "interrupted"
            # Drop a metrics line the abandoned step may have written: the file matches the state.
            ctx.run_dir.rewrite_metrics(state.metrics)
        checkpoint = None
        if state.step > 0:
            if state.saved_step != state.step:
                checkpoint = self._save(ctx, state)
            else:
                checkpoint = ctx.run_dir.checkpoint(state.step)
        result = RunResult(self.path, state.step, status, checkpoint, state.metrics, probe)
        self.emit("phase", {"phase": "finish"})
        for hook in ctx.hooks:
            hook.on_end(result)
        return result

    def _step(self, ctx: RunContext, state: RunState, t_start: float) -> None:
        """One step: rollout -> score -> train (-> eval), its metrics line, then a checkpoint when due.
        A step interrupted before its metrics line leaves `state` as it was (the step is abandoned)."""
        cfg = ctx.cfg
        step = state.step + 1
        t0 = time.perf_counter()
        compiled_before, sys_before = compile_seconds(), system_seconds()
        mode = step_mode(parse_switch(cfg.estimator_switch), state.metrics, estimator=cfg.advantage,
                         group_size=cfg.group_size, prompts=cfg.prompts_per_step)  # fmt: skip
        previous = next((r["estimator"] for r in reversed(state.metrics) if "estimator" in r), cfg.advantage)
        if mode.estimator != previous:  # log each change of estimator with its reason
            what = f"{mode.prompts} prompts x {mode.group_size} with {mode.estimator}"
            self.emit("switch", {"step": step, "line": f"step {step}: {mode.reason}: sampling {what}"})
        records, summary, counters, cursor, replay = collect_rollouts(
            ctx, ctx.policy(state.train.params), step, state.cursor, self.emit, mode=mode, replay=state.replay
        )
        rollout_compile_s = compile_seconds() - compiled_before
        rollout_sys_s = system_seconds() - sys_before
        faults.crash_point("rollout", step)
        row: dict[str, Any] = {"step": step, **summary_metrics(summary), **counters}
        if mode.reason:  # the estimator switch is on: which estimator the step used, and why
            row["estimator"] = mode.estimator
            row["switch_reason"] = mode.reason
        row["rollout_tok_s"] = counters["completion_tokens"] / max(counters["rollout_s"], 1e-9)
        spare, self._spare = self._spare, None
        train, train_row = train_on_records(ctx, state.train, step, records, self.emit, into=spare)
        row.update(train_row)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            row.update(evaluate(ctx, ctx.policy(train.params), step, self.emit))
        row["step_s"] = time.perf_counter() - t0
        row["elapsed_s"] = time.perf_counter() - t_start
        row["compile_s"] = compile_seconds() - compiled_before
        row["rollout_compile_s"] = rollout_compile_s
        row["sys_s"] = system_seconds() - sys_before
        row["rollout_sys_s"] = rollout_sys_s
        row["peak_rss_gb"] = peak_rss_gb()  # of this process (and so of this host), not of the run
        if cfg.save_rollouts:
            from mllmjax.records import write_records

            write_records(records, ctx.run_dir.rollouts_file(step), force=True)
        ctx.run_dir.append_metrics(row)
        # The step is done: from here a crash resumes from the last checkpoint and cuts the line again.
        if train is state.train:  # no update ran: the spare buffers were not used
            self._spare = spare
        elif self._reuse_buffers and self._updated:
            # Only a state an update of this run wrote is spent here; the one the run started from
            # may share its buffers with the KL reference.
            self._spare = state.train
        self._updated = self._updated or train is not state.train
        state.train, state.cursor, state.step, state.replay = train, cursor, step, replay
        self._record(ctx, state, row)
        faults.crash_point("metrics", step)
        if step % cfg.save_every == 0 or step == cfg.steps:
            self._save(ctx, state)

    def _save(self, ctx: RunContext, state: RunState) -> Path:
        """RUN/checkpoints/step_N with the optimizer state and the data cursor; prune to --keep."""
        from mllmjax.checkpoint import copy_side_files, write_checkpoint
        from mllmjax.training import state_extras

        self.emit("phase", {"phase": "checkpoint"})
        step = state.step
        out = ctx.run_dir.checkpoint(step)

        def side_files(d: Path) -> None:
            copy_side_files(ctx.start_checkpoint, d)
            faults.crash_point("checkpoint", step)

        start = str(ctx.start_checkpoint)
        # A vision-language model's checkpoint is the whole model; its state holds the trained parts
        # (with LoRA, the adapters: saved as they are, on the base).
        whole = ctx.vision and ctx.lora_entry is None
        params = ctx.policy(state.train.params) if whole else state.train.params
        write_checkpoint(
            out, params=params, hf_config=ctx.hf_config, write_tokenizer=side_files,
            source=start, step=step, parent=start, force=True, opt_state=state_extras(state.train),
            extra_meta={"reference": ctx.reference, "updates": int(state.train.step),
                        **({"lora": ctx.lora_entry} if ctx.lora_entry is not None else {}),
                        **({"trained": list(ctx.trainer.parts)} if whole else {}),
                        "grpo": {"run": str(self.path), "step": step, "cursor": state.cursor,
                                 **({"replay": state.replay.to_json()} if state.replay is not None
                                    and ctx.cfg.replay_prob > 0 else {})}},
        )  # fmt: skip
        state.saved_step = step
        ctx.run_dir.prune(ctx.cfg.keep)
        return out
