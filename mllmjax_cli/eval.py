"""`mllmjax eval`: not built yet (issue 6)."""

from __future__ import annotations

import typer

from mllmjax.errors import NotBuiltError
from mllmjax_cli.errors import handle_errors


def register(app: typer.Typer) -> None:
    @app.command(
        name="eval",
        help="Accuracy (pass@1, pass@k, maj@k) of a checkpoint on a held-out split. (Not built yet.)",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    @handle_errors
    def eval_(ctx: typer.Context) -> None:
        raise NotBuiltError("'mllmjax eval' is not built yet")
