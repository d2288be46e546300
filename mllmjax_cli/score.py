"""`mllmjax score`: rewards and group advantages for rollout records.

Thin layer over `mllmjax.scoring.score_records`: the flags build a ScoreConfig (bad names fail before any
input is read), records come from a file or stdin, the scored records go to a file or stdout, and the
summary table goes to stderr so it never mixes with piped records (`--json` prints the summary as JSON on
stdout instead).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mllmjax.advantages import ESTIMATORS
from mllmjax.cleanup import check_output
from mllmjax.errors import BadInputError
from mllmjax.records import STDIO, read_records, verify_images, write_records
from mllmjax.rewards import REWARDS
from mllmjax.scoring import ScoreConfig, score_records
from mllmjax.settings import Settings
from mllmjax_cli.errors import err_console, handle_errors
from mllmjax_cli.flags import Override, with_settings
from mllmjax_cli.options import Force, Json

HELP = f"""Add rewards and group advantages to rollout records (JSON Lines, schema mllmjax.rollout/1, or /2 with images).

Reads ROLLOUTS (or stdin for -), checks that every group is complete, scores each completion with the weighted rewards, computes advantages within each group of G, and writes the scored records to -o (a file, or stdout for -) in the schema they came in. The summary table goes to stderr.

Records with images (mllmjax.rollout/2, from `rollout` on a vision-language checkpoint) keep them, their paths rewritten relative to -o's folder; a record whose image file is gone or no longer has the SHA-256 it was sampled with is refused.

\b
Rewards (--reward name=weight,...; known: {", ".join(sorted(REWARDS))}):
  correct: <answer> content, else \\boxed{{}}, else the last number,
           equal to the gold answer under math-verify -> 1
  format:  the whole completion is <think>..</think>\\n<answer>..</answer>
  tags:    +0.25 per tag (of four) appearing exactly once
  custom:  --reward-fn package.module:function[=weight]
           fn(completion: str, answer: str, record: dict) -> float

\b
Advantages (--advantage; known: {", ".join(sorted(ESTIMATORS))}):
  grpo (r-mean)/(std+1e-4); dr_grpo r-mean; rloo r - mean of the others;
  reinforce global z-score; grpo_clip2 grpo + 0.02 global z, clipped

\b
Examples:
  mllmjax score r.jsonl -o s.jsonl
  mllmjax rollout CKPT --data gsm8k -o - | mllmjax score - -o s.jsonl
  mllmjax score r.jsonl --reward correct=1,format=0.2 \\
      --advantage dr_grpo --filter-zero-variance -o s.jsonl
  mllmjax score r.jsonl --reward-fn mypkg.rewards:brevity=0.1 \\
      --overlong mask -o s.jsonl
  mllmjax score r.jsonl --json          # the summary only, as JSON
"""


def register(app: typer.Typer) -> None:
    @app.command(name="score", help=HELP, short_help="Add rewards and group advantages to rollout records.")
    @handle_errors
    @with_settings(
        "reward", "reward_fn", "reward_timeout", "advantage", "overlong", "overlong_penalty", "group_size",
        # Records carry their groups: G is checked against them only when given.
        group_size=Override(None, "Expected G; by default the largest sample index + 1.", type=int | None),
    )  # fmt: skip
    def score(
        rollouts: Annotated[str, typer.Argument(help="Rollout records (JSON Lines), or - for stdin.")],
        filter_zero_variance: Annotated[
            bool,
            typer.Option("--filter-zero-variance", help="Drop groups whose rewards are all equal."),
        ] = False,
        workers: Annotated[
            int,
            typer.Option("--workers", help="Reward worker processes; 0 scores in this process."),
        ] = ScoreConfig.workers,
        out: Annotated[
            Path | None,
            typer.Option(
                "-o", "--out", help="Where to write the scored records (- for stdout); none: summary only."
            ),
        ] = None,
        force: Force = False,
        json_: Json = False,
        **settings: Any,
    ) -> None:
        group_size = settings.pop("group_size")
        config = ScoreConfig.from_settings(
            Settings(**settings),
            filter_zero_variance=filter_zero_variance,
            workers=workers,
            group_size=group_size,
            source="<stdin>" if rollouts == STDIO else rollouts,
        )
        to_stdout = out is not None and str(out) == STDIO
        if to_stdout and json_:
            raise BadInputError("--json prints the summary on stdout; write the records to a file with -o")
        if out is not None and not to_stdout:
            check_output(out, force, file=True)
        records = read_records(rollouts)
        verify_images(records, source="<stdin>" if rollouts == STDIO else rollouts)
        scored, summary = score_records(records, config)
        if out is not None:
            write_records(scored, out, force=force)
        if json_:
            print(json.dumps(summary, indent=2))
        else:
            err_console.print(summary_table(summary, out=None if out is None else str(out)))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_table(summary: dict[str, Any], *, out: str | None) -> Table:
    """The human summary: one row per quantity, in the order a reader checks them."""
    table = Table(title=f"score: {summary['source']}", show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row(
        "records / groups x G", f"{summary['records']} / {summary['groups']} x {summary['group_size']}"
    )
    for name, mean in summary["rewards_mean"].items():
        weight = summary["reward_weights"].get(name)
        label = f"reward {name}" + (f" (x{weight:g})" if weight is not None else "")
        table.add_row(label, _fmt(mean))
    table.add_row(
        "reward (weighted) mean / std",
        f"{_fmt(summary['reward']['mean'])} / {_fmt(summary['reward']['std'])}",
    )
    table.add_row("accuracy", _fmt(summary["accuracy"]))
    table.add_row("frac_reward_zero_std", _fmt(summary["frac_reward_zero_std"]))
    adv = summary["advantage"]
    table.add_row(
        f"advantage ({summary['advantage_estimator']}) mean / min / max",
        f"{_fmt(adv['mean'])} / {_fmt(adv['min'])} / {_fmt(adv['max'])}",
    )
    tokens = summary["completion_tokens"]
    table.add_row(
        "completion tokens mean / p50 / max",
        f"{_fmt(tokens['mean'], 1)} / {_fmt(tokens['p50'], 1)} / {_fmt(tokens['max'], 0)}",
    )
    if "mean_correct" in tokens:
        table.add_row(
            "tokens mean correct / incorrect",
            f"{_fmt(tokens['mean_correct'], 1)} / {_fmt(tokens['mean_incorrect'], 1)}",
        )
    table.add_row("truncation rate", _fmt(summary["truncation_rate"]))
    errors = summary["reward_errors"]
    detail = ", ".join(f"{k}: {v}" for k, v in summary["reward_errors_by_name"].items())
    table.add_row("reward errors", f"{errors}" + (f" ({detail})" if detail else ""))
    for name, message in summary["reward_error_examples"].items():
        table.add_row(f"  first {name} error", message[:100])
    if summary["groups_dropped"]:
        table.add_row("groups dropped (zero variance)", str(summary["groups_dropped"]))
    table.add_row("records written", f"{summary['records_written']} -> {out}" if out else "0 (no -o)")
    table.add_row("completions/s", _fmt(summary["completions_per_s"], 0))
    return table
