"""`mllmjax grpo`: not built yet (issue 6)."""

from __future__ import annotations

import typer

from mllmjax.errors import NotBuiltError
from mllmjax_cli.errors import handle_errors


def register(app: typer.Typer) -> None:
    @app.command(
        name="grpo",
        help="The whole GRPO loop in one process, with live progress. (Not built yet.)",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    @handle_errors
    def grpo(ctx: typer.Context) -> None:
        raise NotBuiltError("'mllmjax grpo' is not built yet")
