"""`mllmjax score`: not built yet (issue 4)."""

from __future__ import annotations

import typer
from mllmjax.errors import NotBuiltError

from mllmjax_cli.errors import handle_errors


def register(app: typer.Typer) -> None:
    @app.command(
        name="score",
        help="Add rewards and group advantages to rollout records. (Not built yet.)",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    @handle_errors
    def score(ctx: typer.Context) -> None:
        raise NotBuiltError("'mllmjax score' is not built yet")
