"""Reporting as hooks: the loop calls every hook with its progress events, each metrics row and the
result; plots, TensorBoard, W&B (and the CLI's live display) subscribe. Also the pure helpers a
display needs: which terms a run does not compute, and the ETA from the run's own step times."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllmjax.errors import BadInputError
from mllmjax.grpo.config import GRPOConfig

if TYPE_CHECKING:
    from mllmjax.grpo.loop import RunResult


class Hook:
    """Follows a run; every method is optional. The loop calls the hooks in order, on every process of
    a multi-host run (the ones that write files are only made on the primary process)."""

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        """Progress: start (step, steps, resumed, start_checkpoint), convert (out), memory (line, bytes),
        phase (phase), rollout_progress (tokens, samples), update (one PPO update's metrics), switch (step,
        line), probe (`stages.probe_signal`'s counts and line, before the first step)."""

    def on_metrics(self, row: dict[str, Any]) -> None:
        """Each row appended to metrics.jsonl: step 0's evaluation before training, then every step."""

    def on_end(self, result: RunResult) -> None:
        """Once, after the last checkpoint is written (also when the run stopped or was interrupted)."""


PLOTS = {
    "reward": ("reward", "reward (weighted mean)"),
    "accuracy": ("accuracy", "accuracy (train samples)"),
    "kl": ("kl", "KL to the reference"),
    "entropy": ("entropy", "entropy (nats / token)"),
    "length": ("completion_len", "completion length (tokens)"),
}


def draw_plots(out_dir: Path, metrics: Sequence[dict[str, Any]]) -> list[Path]:
    """PNG curves of reward, accuracy (with held-out eval accuracy and format rate when present), KL,
    entropy and length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(exist_ok=True)
    written = []
    for name, (key, title) in PLOTS.items():
        pts = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=key)
        if name == "accuracy":
            for series, label, style in (("eval/accuracy", "held-out (greedy)", "-"),
                                         ("eval/format", "held-out format", "--")):  # fmt: skip
                ev = [(m["step"], m[series]) for m in metrics if m.get(series) is not None]
                if ev:
                    xs, ys = zip(*ev, strict=True)
                    ax.plot(xs, ys, marker="o", linestyle=style, label=label)
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


def held_out_change(metrics: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]] | None:
    """The held-out evaluation before the first step and the last one after it, from the run's metrics
    rows: {"before": {"accuracy", "format"}, "after": {...}}; None unless the run has both."""
    evals = [m for m in metrics if m.get("eval/accuracy") is not None]
    before = next((m for m in evals if m["step"] == 0), None)
    after = next((m for m in reversed(evals) if m["step"] > 0), None)
    if before is None or after is None:
        return None
    return {
        name: {"step": int(m["step"]), "accuracy": m["eval/accuracy"], "format": m["eval/format"]}
        for name, m in (("before", before), ("after", after))
    }


def held_out_line(change: dict[str, dict[str, float]]) -> str:
    """'held-out accuracy 6% -> 44%, format 100% -> 97%'."""
    b, a = change["before"], change["after"]
    return (
        f"held-out accuracy {b['accuracy']:.0%} -> {a['accuracy']:.0%}, "
        f"format {b['format']:.0%} -> {a['format']:.0%}"
    )


class PlotHook(Hook):
    """RUN/plots/*.png, drawn when the run ends or stops."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def on_end(self, result: RunResult) -> None:
        if result.metrics:
            draw_plots(self.out_dir, result.metrics)


class TensorBoardHook(Hook):
    """Every numeric metric as a scalar in RUN/tensorboard."""

    extra = "tensorboard"

    def __init__(self, run_dir: Path, cfg: GRPOConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def on_metrics(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if isinstance(v, int | float) and k != "step":
                self.writer.add_scalar(k, v, int(row["step"]))
        self.writer.flush()

    def on_end(self, result: RunResult) -> None:
        self.writer.close()


class WandBHook(Hook):
    """Every numeric metric logged to a W&B run named for the run directory."""

    extra = "wandb"

    def __init__(self, run_dir: Path, cfg: GRPOConfig):
        import wandb

        self.run = wandb.init(project="mllmjax", name=run_dir.name, dir=str(run_dir), config=cfg.to_dict())

    def on_metrics(self, row: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=int(row["step"]))

    def on_end(self, result: RunResult) -> None:
        self.run.finish()


REPORTERS: dict[str, type[TensorBoardHook] | type[WandBHook]] = {
    "tensorboard": TensorBoardHook,
    "wandb": WandBHook,
}


def check_reporters(names: Sequence[str]) -> None:
    """Fail on a missing extra before anything is written."""
    import importlib

    for name in names:
        extra = REPORTERS[name].extra
        try:
            importlib.import_module(extra)
        except ImportError as e:
            raise BadInputError(
                f"--report-to {name} needs the {extra} package: pip install 'mllmjax[{extra}]'"
            ) from e


def reporting_hooks(cfg: GRPOConfig, run_dir: Path, plots_dir: Path) -> list[Hook]:
    """The hooks that write a run's reports: plots, then each --report-to sink."""
    return [PlotHook(plots_dir), *(REPORTERS[name](run_dir, cfg) for name in cfg.report_to)]


def terms_off(cfg: GRPOConfig) -> frozenset[str]:
    """The metrics a run with these settings does not compute (a display shows `off`, not a number):
    the KL with --beta 0 (no reference model), held-out accuracy with --eval-every 0, the clip fraction
    with one PPO epoch of one minibatch (the only update is on-policy, ratio 1, nothing to clip), and the
    sampling rounds without --dynamic-sampling."""
    off = set()
    if cfg.beta == 0:
        off.add("kl")
    if not cfg.eval_every:
        off.add("eval/accuracy")
    if cfg.ppo_epochs == 1 and cfg.minibatches == 1:
        off.add("clip_frac")
    if not cfg.dynamic_sampling:
        off.add("sampling_rounds")
    return frozenset(off)


def steady_step_seconds(row: dict[str, Any], *, first: bool = False, cores: int | None = None) -> float:
    """What a step like this one takes once nothing is left to compile or to fault in, from its metrics
    row: its time less its JAX compile time (`compile_s`) and less its system CPU time (`sys_s`: the
    kernel zeroing pages the process touches for the first time, as its heap grows to its peak) spread
    over the `cores` (default: the cores this process may run on). `first`: the first step a process
    runs, whose sampling rounds count as one (an untrained policy needs the most dynamic-sampling rounds
    of the run)."""
    cores = cores or len(os.sched_getaffinity(0))
    seconds = row["step_s"] - row.get("compile_s", 0.0) - row.get("sys_s", 0.0) / cores
    if first:
        rounds = max(int(row.get("sampling_rounds", 1)), 1)
        rollout = row["rollout_s"] - row.get("rollout_compile_s", 0.0) - row.get("rollout_sys_s", 0.0) / cores
        seconds -= max(rollout, 0.0) * (rounds - 1) / rounds
    return max(seconds, 0.0)


def eta_seconds(rows: Sequence[dict[str, Any]], remaining: int, cores: int | None = None) -> float | None:
    """Seconds the `remaining` steps will take: the mean steady time (`steady_step_seconds`) of the steps
    this process ran so far (their metrics rows, in order), times the steps left; None before any step.
    Compilation is left out, so a recompile for a new shape later in the run is not foreseen."""
    if remaining <= 0:
        return 0.0
    if not rows:
        return None
    steady = [steady_step_seconds(r, first=i == 0, cores=cores) for i, r in enumerate(rows)]
    return sum(steady) / len(steady) * remaining
