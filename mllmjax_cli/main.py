"""The `mllmjax` Typer app: registers one module per command."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from mllmjax_cli import convert, export, grpo, rollout, sample, score, train
from mllmjax_cli import eval as eval_cmd
from mllmjax_cli.errors import err_console, handle_errors, set_debug
from mllmjax_cli.helptext import prose

app = typer.Typer(
    name="mllmjax",
    help="GRPO reinforcement learning of open LLMs in JAX: convert, sample, rollout, score, train, grpo, "
    "eval, export. Stages pass work through files, so each runs alone or in a shell pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Commands that run as one program over every host's devices (see mllmjax.distributed).
MULTIHOST_COMMANDS = ("rollout", "train", "grpo", "eval")


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks (also MLLMJAX_DEBUG=1).")
    ] = False,
    coordinator: Annotated[
        str | None,
        typer.Option(
            "--coordinator",
            help="Multi-host: process 0's HOST:PORT (also MLLMJAX_COORDINATOR); SLURM and TPU pods are "
            "detected without it.",
        ),
    ] = None,
    num_processes: Annotated[
        int | None, typer.Option("--num-processes", help="Multi-host: how many processes (one per host).")
    ] = None,
    process_id: Annotated[
        int | None, typer.Option("--process-id", help="Multi-host: this process's index, 0 .. N-1.")
    ] = None,
    no_compile_cache: Annotated[
        bool,
        typer.Option(
            "--no-compile-cache",
            help="Compile every XLA program afresh instead of reusing the persistent compilation cache "
            "and the sampler's stored programs (~/.cache/mllmjax/xla and programs, moved by MLLMJAX_CACHE; "
            "also MLLMJAX_COMPILE_CACHE=0).",
        ),
    ] = False,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify",
            help="Load checkpoints without checking each array against the checksum recorded when it was "
            "written (also MLLMJAX_NO_VERIFY=1).",
        ),
    ] = False,
) -> None:
    set_debug(debug)
    if no_verify:
        os.environ["MLLMJAX_NO_VERIFY"] = "1"  # read by mllmjax.checksums (not imported here: no jax yet)
    if ctx.invoked_subcommand is not None:
        from mllmjax.runtime import COMPILE_CACHE_VAR, enable_compile_cache, sync_dispatch_if_asked

        sync_dispatch_if_asked()  # before any JAX backend exists
        # Before the first compilation.
        enable_compile_cache({**os.environ, COMPILE_CACHE_VAR: "0"} if no_compile_cache else os.environ)
    handle_errors(_start_distributed)(ctx.invoked_subcommand, coordinator, num_processes, process_id)


def _start_distributed(
    command: str | None, coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
    from mllmjax.distributed import initialize, is_primary, requested
    from mllmjax.errors import BadInputError

    if requested(coordinator, num_processes, process_id) and command not in MULTIHOST_COMMANDS:
        raise BadInputError(
            f"`mllmjax {command}` runs on one host; multi-host runs support {', '.join(MULTIHOST_COMMANDS)}"
        )
    if initialize(coordinator, num_processes, process_id) and not is_primary():
        # Process 0 reports for the run; the others print only errors.
        err_console.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


for module in (convert, sample, rollout, score, train, grpo, eval_cmd, export):
    module.register(app)
for command in app.registered_commands:  # one line per prose paragraph: Typer wraps it to the terminal
    command.help = prose(command.help) if command.help else command.help


def main() -> None:
    app()


if __name__ == "__main__":
    main()
