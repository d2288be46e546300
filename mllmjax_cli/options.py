"""Options that several commands share and that are not settings (those come from `mllmjax_cli.flags`),
so that a flag means the same thing wherever it appears."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Out = Annotated[Path, typer.Option("-o", "--out", help="Where to write the result.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]

# Sampling: sample, rollout and eval.
Greedy = Annotated[bool, typer.Option("--greedy", help="Shorthand for --temperature 0.")]

# Data: rollout and eval.
NumPrompts = Annotated[int | None, typer.Option("--num-prompts", help="How many prompts (default: all).")]
Offset = Annotated[int, typer.Option("--offset", help="Skip this many prompts first.")]
Shuffle = Annotated[bool, typer.Option("--shuffle", help="Shuffle the prompts (deterministic for --seed).")]

# Images: rollout and eval on a vision-language checkpoint.
ImageField = Annotated[
    str,
    typer.Option(
        "--image-field",
        # the same help as grpo's setting (GRPOConfig.image_field): one flag, one meaning
        help="Data record field holding a prompt's images (a path or a list of paths, relative to the data "
        "file, or a datasets Image feature); read on a vision-language checkpoint.",
    ),
]


def image_dir_option(default: str) -> object:
    """The --image-dir option of a command that samples a visual built-in task; default: where its
    pictures go without it."""
    return Annotated[
        Path | None,
        typer.Option(
            "--image-dir",
            help="Where a visual built-in task (builtin:count, builtin:read) draws its pictures, and images held "
            f"in data records (a datasets Image feature) are written (default: {default}).",
        ),
    ]
