"""The live display of `mllmjax grpo`: a rich progress view on a terminal, one log line per step
otherwise, and the signal handling that lets Ctrl-C finish the current step."""

from __future__ import annotations

import json
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
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from mllmjax.grpo import GRPOConfig, Hook, eta_seconds, held_out_change, held_out_line, terms_off
from mllmjax_cli.errors import err_console


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _clock(seconds: float | None) -> str:
    """H:MM:SS, or -:--:-- while unknown (rich's own format)."""
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class _EtaColumn(ProgressColumn):
    """The run's own ETA: rich's TimeRemainingColumn only sees updates within 30 s, and a step is longer."""

    def __init__(self, display: Display):
        super().__init__()
        self.display = display

    def render(self, task: Task) -> Text:
        return Text(_clock(self.display.remaining_s()), style="progress.remaining")


class Display(Hook):
    """Live rich display on a terminal; one plain log line per step otherwise."""

    def __init__(self, cfg: GRPOConfig):
        self.live_mode = err_console.is_terminal
        self.steps = cfg.steps
        self.off = terms_off(cfg)
        self.last: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.first_eval: dict[str, Any] | None = None  # the held-out evaluation before the first step
        self.phase = "starting"
        # The ETA: from the metrics rows of the steps this process ran, counting down between them.
        self._mark = time.perf_counter()
        self._rows: list[dict[str, Any]] = []
        self._eta: float | None = None
        self.progress = Progress(
            TextColumn("[bold]grpo[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
            TimeElapsedColumn(), TextColumn("ETA"), _EtaColumn(self), console=err_console,
        )  # fmt: skip
        self.task = self.progress.add_task("starting", total=self.steps)
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

    def remaining_s(self) -> float | None:
        """Seconds left: the estimate made at the last step, counting down since."""
        if self._eta is None:
            return None
        return max(0.0, self._eta - (time.perf_counter() - self._mark))

    def _val(self, m: dict[str, Any], key: str, spec: str = ".3f") -> str:
        return "off" if key in self.off else _fmt(m.get(key), spec)

    def _table(self) -> Table:
        m, v = self.last, self._val
        t = Table(show_header=False, box=None, pad_edge=False)
        for _ in range(4):
            t.add_column(style="dim")
            t.add_column(justify="right")
        rewards = " ".join(
            f"{k.split('/', 1)[1]} {_fmt(x, '.2f')}" for k, x in m.items() if k.startswith("reward/")
        )
        rows = [
            ("reward", v(m, "reward"), "accuracy", v(m, "accuracy"),
             "eval acc", v(self.last_eval, "eval/accuracy"), "lr", v(m, "lr", ".2e")),
            ("kl", v(m, "kl", ".4f"), "entropy", v(m, "entropy"),
             "clip frac", v(m, "clip_frac"), "|grad|", v(m, "grad_norm")),
            ("length", v(m, "completion_len", ".1f"), "truncated", v(m, "truncation_rate"),
             "zero-var", v(m, "frac_reward_zero_std"), "rounds", v(m, "sampling_rounds", ".0f")),
            ("rollout s", v(m, "rollout_s", ".1f"), "train s", v(m, "train_s", ".1f"),
             "sample tok/s", v(m, "rollout_tok_s", ".0f"), "train tok/s", v(m, "train_tok_s", ".0f")),
            ("logp gap", v(m, "logp_mismatch_mean", ".1e"), "gap max", v(m, "logp_mismatch_max", ".1e"),
             "ratio min", v(m, "ratio_min"), "ratio max", v(m, "ratio_max")),
        ]  # fmt: skip
        for r in rows:
            t.add_row(*r)
        if "entropy_loss" in m:
            t.add_row("ent loss", v(m, "entropy_loss", "+.4f"), "policy loss", v(m, "policy_loss", "+.4f"))
        if "estimator" in m or "replayed" in m:
            t.add_row("estimator", str(m.get("estimator", "")), "replayed", v(m, "replayed", ".0f"),
                      "buffer", v(m, "replay_buffer", ".0f"))
        if rewards:
            t.add_row("rewards", rewards)
        if self.first_eval is not None:  # held-out before the first step -> the latest evaluation
            b, a = self.first_eval, self.last_eval or self.first_eval
            t.add_row("held-out acc", f"{b['eval/accuracy']:.0%} -> {a['eval/accuracy']:.0%}",
                      "format", f"{b['eval/format']:.0%} -> {a['eval/format']:.0%}")  # fmt: skip
        return t

    def _render(self) -> Any:
        return Group(self.progress, self._table())

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render())

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "start":
            self._mark = time.perf_counter()
            self.progress.update(self.task, completed=data["step"])
            if data["resumed"]:
                self.log(f"resuming at step {data['step']} of {data['steps']}")
        elif kind == "convert":
            self.log(f"converting the model into the cache: {data['out']}")
        elif kind in ("memory", "switch", "probe"):
            self.log(data["line"])
        elif kind == "phase":
            self.phase = data["phase"]
            self.progress.update(self.task, description=self.phase)
        elif kind == "rollout_progress":
            self.progress.update(
                self.task, description=f"rollout {data['samples']} samples, {data['tokens']} tokens"
            )
        elif kind == "update":
            kl = "off" if "kl" in self.off else f"{data['kl']:.4f}"
            aux = f" router aux {data['router_aux']:.4f}" if "router_aux" in data else ""
            aux += f" ent loss {data['entropy_loss']:+.4f}" if "entropy_loss" in data else ""
            self.progress.update(
                self.task,
                description=f"train: loss {data['loss']:+.4f} kl {kl} |g| {data['grad_norm']:.3f}{aux}",
            )
        self._refresh()

    def on_metrics(self, row: dict[str, Any]) -> None:
        now = time.perf_counter()
        if row["step"] == 0:  # the evaluation before training
            self.last_eval = self.first_eval = row
            self.log(f"step 0: eval accuracy {row['eval/accuracy']:.3f}, format {row['eval/format']:.3f}")
        else:
            self._rows.append(row)
            self._eta = eta_seconds(self._rows, self.steps - row["step"])
            self.last = row
            if "eval/accuracy" in row:
                self.last_eval = row
            self.progress.update(self.task, completed=row["step"])
        self._mark = now
        if row["step"] and not self.live_mode:
            self.log(_log_line(row, self.steps, self.off, self._eta))
        self._refresh()

    def log(self, message: str) -> None:
        if self.live is not None:
            self.live.console.print(message)
        else:
            err_console.print(message)


def _log_line(m: dict[str, Any], steps: int, off: frozenset[str], eta: float | None) -> str:
    def v(key: str, spec: str = ".3f") -> str:
        return "off" if key in off else _fmt(m.get(key), spec)

    parts = [f"step {m['step']}/{steps}", f"eta {_clock(eta)}", f"reward {v('reward')}", f"acc {v('accuracy')}",
             f"kl {v('kl', '.4f')}", f"ent {v('entropy')}", f"clip {v('clip_frac')}",
             f"len {v('completion_len', '.1f')}", f"trunc {v('truncation_rate', '.2f')}",
             f"zero-var {v('frac_reward_zero_std', '.2f')}", f"rollout {v('rollout_s', '.1f')}s",
             f"train {v('train_s', '.1f')}s", f"{v('rollout_tok_s', '.0f')} tok/s",
             f"logp gap max {v('logp_mismatch_max', '.1e')}"]  # fmt: skip
    if "entropy_loss" in m:
        parts.append(f"ent loss {m['entropy_loss']:+.4f}")
    if "estimator" in m:
        parts.append(f"estimator {m['estimator']} ({m['switch_reason']})")
    if "replayed" in m:
        parts.append(f"replayed {m['replayed']:.0f} buffer {m['replay_buffer']:.0f}")
    if "eval/accuracy" in m:
        parts.append(f"eval acc {m['eval/accuracy']:.3f}")
    return "  ".join(parts)


class _Signals:
    """First SIGINT/SIGTERM: stop after the current step. Second: abandon it (KeyboardInterrupt). Third:
    exit at once (130 / 143), for a step that does not come back from a compiled call."""

    def __init__(self, display: Display):
        self.display = display
        self.count = 0
        self._graceful: Any = None

    def __enter__(self) -> _Signals:
        from mllmjax_cli import interrupts

        self._graceful = interrupts.graceful(self._handle)  # a third signal still exits at once
        self._graceful.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._graceful.__exit__(*exc)

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


def run_with_display(cfg: GRPOConfig, run_dir: Path, *, resume: bool, force: bool, json_out: bool) -> None:
    """Run the loop under the live display; print the summary (and JSON with --json)."""
    from mllmjax.grpo import GRPORun
    from mllmjax.grpo.loop import peak_rss_gb

    display = Display(cfg)
    loop = GRPORun(cfg, run_dir, resume=resume, force=force, hooks=[display])
    started = time.perf_counter()
    with display, _Signals(display) as signals:
        result = loop.run(stop_requested=signals.stop_requested)
    summary = {"run": str(result.run_dir), "status": result.status, "step": result.step, "steps": cfg.steps,
               "checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "seconds": time.perf_counter() - started, "peak_rss_gb": peak_rss_gb()}  # fmt: skip
    if result.probe is not None:
        summary["probe"] = {k: v for k, v in result.probe.items() if k != "line"}
    last_eval = next((m for m in reversed(result.metrics) if "eval/accuracy" in m), None)
    if last_eval is not None:
        summary["eval_accuracy"] = last_eval["eval/accuracy"]
    change = held_out_change(result.metrics)
    if change is not None:
        summary["held_out"] = change
    if json_out:
        typer.echo(json.dumps(summary))
    if result.status == "done":
        err_console.print(
            f"done: {result.step} steps in {summary['seconds']:.0f}s, peak memory {summary['peak_rss_gb']:.1f} GB; "
            f"run {result.run_dir}, final checkpoint {result.checkpoint}, plots in {result.run_dir / 'plots'}"
        )
        if change is not None:
            err_console.print(held_out_line(change))
    else:
        err_console.print(
            f"stopped after step {result.step} of {cfg.steps}; checkpoint {result.checkpoint}. "
            f"Resume with: mllmjax grpo --resume {result.run_dir}"
        )
