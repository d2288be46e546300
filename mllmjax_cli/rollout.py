"""`mllmjax rollout`: not built yet (issue 4)."""

from __future__ import annotations

import typer

from mllmjax.errors import NotBuiltError
from mllmjax_cli.errors import handle_errors


def register(app: typer.Typer) -> None:
    @app.command(
        name="rollout",
        help="Sample G completions per prompt into rollout records (JSON Lines). (Not built yet.)",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    @handle_errors
    def rollout(ctx: typer.Context) -> None:
        raise NotBuiltError("'mllmjax rollout' is not built yet")
