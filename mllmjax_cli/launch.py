"""The `mllmjax` console entry point: process settings that must precede jax, then the Typer app.

Kept apart from `mllmjax_cli.main` because that module imports jax: the re-exec (see
`mllmjax.runtime`) has to happen first, and costs nothing when it does.
"""

from __future__ import annotations

import sys

from mllmjax.runtime import reexec_with_malloc_tuning


def main() -> None:
    reexec_with_malloc_tuning([sys.executable, "-m", "mllmjax_cli.launch", *sys.argv[1:]])
    from mllmjax_cli.main import app

    app(prog_name="mllmjax")


if __name__ == "__main__":
    main()
