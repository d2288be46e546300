"""The `mllmjax` console entry point: process settings that must precede jax, then the Typer app.

Kept apart from `mllmjax_cli.main` because that module imports jax: the re-exec (see
`mllmjax.runtime`) has to happen first, and costs nothing when it does.
"""

from __future__ import annotations

import sys

from mllmjax.runtime import reexec_with_malloc_tuning


def main() -> None:
    args = sys.argv[1:]
    if args and not {"-h", "--help"} & set(args):  # help runs no JAX: not worth a second start
        reexec_with_malloc_tuning([sys.executable, "-m", "mllmjax_cli.launch", *args])
    from mllmjax_cli.main import app

    app(prog_name="mllmjax")


if __name__ == "__main__":
    main()
