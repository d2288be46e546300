"""The progress bar every stage shows on stderr (transient: it leaves the terminal clean)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mllmjax_cli.errors import err_console


def stage_progress(label: str) -> Progress:
    """`label [bar] done/total description elapsed`; update the task's description with live rates.
    Off when stderr is not a terminal (logs and pipes get the one-line summary, not bar redraws)."""
    return Progress(
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )
