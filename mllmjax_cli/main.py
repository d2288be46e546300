"""The `mllmjax` Typer app: registers one module per command."""

from __future__ import annotations

from typing import Annotated

import typer

from mllmjax_cli import convert, export, grpo, rollout, sample, score, train
from mllmjax_cli import eval as eval_cmd
from mllmjax_cli.errors import set_debug

app = typer.Typer(
    name="mllmjax",
    help="GRPO reinforcement learning of open LLMs in JAX: convert, sample, rollout, score, train, grpo, "
    "eval, export. Stages pass work through files, so each runs alone or in a shell pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks (also MLLMJAX_DEBUG=1).")
    ] = False,
) -> None:
    set_debug(debug)


for module in (convert, sample, rollout, score, train, grpo, eval_cmd, export):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
