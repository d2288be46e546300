"""The one place where library errors become a one-line message and an exit code."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mllmjax.errors import MllmjaxError

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
# Errors go through their own console: in a multi-host run the others (progress, logs) are quiet on
# every process but 0, while an error on any process must still be seen.
_fail_console = Console(stderr=True, highlight=False, soft_wrap=True)

_debug = False


def set_debug(value: bool) -> None:
    global _debug
    _debug = value


def debug_enabled() -> bool:
    return _debug or os.environ.get("MLLMJAX_DEBUG", "") not in ("", "0")


def handle_errors(fn: F) -> F:
    """Wrap a command: a MllmjaxError prints `error: MESSAGE` and exits with its code (2 for bad
    input, 1 at run time); Ctrl-C exits 130. Tracebacks only with --debug or MLLMJAX_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MllmjaxError as e:
            if debug_enabled():
                raise
            _fail_console.print(f"[bold red]error:[/] {escape(_one_line(str(e)))}", markup=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _fail_console.print("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as e:  # an unexpected failure is still one line unless debugging
            if debug_enabled():
                raise
            _fail_console.print(
                f"[bold red]error:[/] {type(e).__name__}: {escape(_one_line(str(e)))} (run with --debug for the traceback)",
                markup=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _one_line(message: str) -> str:
    return " ".join(message.split()) if message else "(no message)"
