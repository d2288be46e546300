"""The `mllmjax` command line: a thin Typer layer over the `mllmjax` library."""
