"""`mllmjax train`: not built yet (issue 5)."""

from __future__ import annotations

import typer

from mllmjax.errors import NotBuiltError
from mllmjax_cli.errors import handle_errors


def register(app: typer.Typer) -> None:
    @app.command(
        name="train",
        help="Run PPO epochs of the GRPO loss on scored rollouts; write a new checkpoint. (Not built yet.)",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    @handle_errors
    def train(ctx: typer.Context) -> None:
        raise NotBuiltError("'mllmjax train' is not built yet")
