"""`mllmjax sample`: not built yet (issue 3)."""

from __future__ import annotations

import typer
from mllmjax.errors import NotBuiltError

from mllmjax_cli.errors import handle_errors


def register(app: typer.Typer) -> None:
    @app.command(
        name="sample",
        help="Generate completions with the JAX decoder. (Not built yet.)",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    @handle_errors
    def sample(ctx: typer.Context) -> None:
        raise NotBuiltError("'mllmjax sample' is not built yet")
