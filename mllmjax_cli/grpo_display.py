"""The live display of `mllmjax grpo`: a rich progress view on a terminal, one log line per step
otherwise, and the signal handling that lets Ctrl-C finish the current step."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mllmjax_cli.errors import err_console


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


class Display:
    """Live rich display on a terminal; one plain log line per step otherwise."""

    def __init__(self, steps: int):
        self.live_mode = err_console.is_terminal
        self.steps = steps
        self.last: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.phase = "starting"
        self.rollout_tokens = 0
        self.progress = Progress(
            TextColumn("[bold]grpo[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
        )  # fmt: skip
        self.task = self.progress.add_task("starting", total=steps)
        self.live = (
            Live(self._render(), console=err_console, refresh_per_second=4, transient=False)
            if self.live_mode
            else None
        )

    def __enter__(self) -> Display:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def _table(self) -> Table:
        m = self.last
        t = Table(show_header=False, box=None, pad_edge=False)
        for _ in range(4):
            t.add_column(style="dim")
            t.add_column(justify="right")
        rewards = " ".join(
            f"{k.split('/', 1)[1]} {_fmt(v, '.2f')}" for k, v in m.items() if k.startswith("reward/")
        )
        rows = [
            ("reward", _fmt(m.get("reward")), "accuracy", _fmt(m.get("accuracy")),
             "eval acc", _fmt(self.last_eval.get("eval/accuracy")), "lr", _fmt(m.get("lr"), ".2e")),
            ("kl", _fmt(m.get("kl"), ".4f"), "entropy", _fmt(m.get("entropy")),
             "clip frac", _fmt(m.get("clip_frac")), "|grad|", _fmt(m.get("grad_norm"))),
            ("length", _fmt(m.get("completion_len"), ".1f"), "truncated", _fmt(m.get("truncation_rate")),
             "zero-var", _fmt(m.get("frac_reward_zero_std")), "rounds", _fmt(m.get("sampling_rounds"), ".0f")),
            ("rollout s", _fmt(m.get("rollout_s"), ".1f"), "train s", _fmt(m.get("train_s"), ".1f"),
             "sample tok/s", _fmt(m.get("rollout_tok_s"), ".0f"), "train tok/s", _fmt(m.get("train_tok_s"), ".0f")),
        ]  # fmt: skip
        for r in rows:
            t.add_row(*r)
        if rewards:
            t.add_row("rewards", rewards)
        return t

    def _render(self) -> Any:
        return Group(self.progress, self._table())

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "start":
            self.progress.update(self.task, completed=data["step"])
            if data["resumed"]:
                self.log(f"resuming at step {data['step']} of {data['steps']}")
        elif kind == "convert":
            self.log(f"converting the model into the cache: {data['out']}")
        elif kind == "memory":
            self.log(data["line"])
        elif kind == "phase":
            self.phase = data["phase"]
            self.rollout_tokens = 0
            self.progress.update(self.task, description=self.phase)
        elif kind == "rollout_progress":
            self.progress.update(
                self.task, description=f"rollout {data['samples']} samples, {data['tokens']} tokens"
            )
        elif kind == "update":
            self.progress.update(
                self.task,
                description=f"train: loss {data['loss']:+.4f} kl {data['kl']:.4f} |g| {data['grad_norm']:.3f}",
            )
        elif kind == "eval":
            self.last_eval = data
            self.log(
                f"step {data['step']}: eval accuracy {data['eval/accuracy']:.3f}, format {data['eval/format']:.3f}"
            )
        elif kind == "step":
            self.last = data
            if "eval/accuracy" in data:
                self.last_eval = data
            self.progress.update(self.task, completed=data["step"])
            if not self.live_mode:
                self.log(_log_line(data, self.steps))
        self._refresh()

    def log(self, message: str) -> None:
        if self.live is not None:
            self.live.console.print(message)
        else:
            err_console.print(message)


def _log_line(m: dict[str, Any], steps: int) -> str:
    parts = [f"step {m['step']}/{steps}", f"reward {_fmt(m.get('reward'))}", f"acc {_fmt(m.get('accuracy'))}",
             f"kl {_fmt(m.get('kl'), '.4f')}", f"ent {_fmt(m.get('entropy'))}", f"clip {_fmt(m.get('clip_frac'))}",
             f"len {_fmt(m.get('completion_len'), '.1f')}", f"trunc {_fmt(m.get('truncation_rate'), '.2f')}",
             f"zero-var {_fmt(m.get('frac_reward_zero_std'), '.2f')}", f"rollout {_fmt(m.get('rollout_s'), '.1f')}s",
             f"train {_fmt(m.get('train_s'), '.1f')}s", f"{_fmt(m.get('rollout_tok_s'), '.0f')} tok/s"]  # fmt: skip
    if "eval/accuracy" in m:
        parts.append(f"eval acc {m['eval/accuracy']:.3f}")
    return "  ".join(parts)


class _Signals:
    """First SIGINT/SIGTERM: stop after the current step. Second: abandon it (KeyboardInterrupt)."""

    def __init__(self, display: Display):
        self.display = display
        self.count = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            self.display.log(
                "stopping after this step and writing a checkpoint (press Ctrl-C again to abandon the step)"
            )
        else:
            raise KeyboardInterrupt

    def stop_requested(self) -> bool:
        return self.count > 0


def run_with_display(cfg: Any, run_dir: Path, *, resume: bool, force: bool, json_out: bool) -> None:
    """Run the loop under the live display; print the summary (and JSON with --json)."""
    from mllmjax.grpo import GRPORun

    loop = GRPORun(cfg, run_dir, resume=resume, force=force)
    display = Display(cfg.steps)
    loop.emit = display.event
    started = time.perf_counter()
    with display, _Signals(display) as signals:
        result = loop.run(stop_requested=signals.stop_requested)
    summary = {"run": str(result.run_dir), "status": result.status, "step": result.step, "steps": cfg.steps,
               "checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "seconds": time.perf_counter() - started}  # fmt: skip
    last_eval = next((m for m in reversed(result.metrics) if "eval/accuracy" in m), None)
    if last_eval is not None:
        summary["eval_accuracy"] = last_eval["eval/accuracy"]
    if json_out:
        typer.echo(json.dumps(summary))
    if result.status == "done":
        err_console.print(
            f"done: {result.step} steps in {summary['seconds']:.0f}s; run {result.run_dir}, final checkpoint "
            f"{result.checkpoint}, plots in {result.run_dir / 'plots'}"
        )
    else:
        err_console.print(
            f"stopped after step {result.step} of {cfg.steps}; checkpoint {result.checkpoint}. "
            f"Resume with: mllmjax grpo --resume {result.run_dir}"
        )
