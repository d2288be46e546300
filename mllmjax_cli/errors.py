"""The one place where library errors become a one-line message and an exit code."""

from __future__ import annotations

import functools
import logging
import os
import sys
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
    input, 1 at run time); Ctrl-C exits 130 and SIGTERM 143 at once, removing temp files
    (`mllmjax_cli.interrupts`); a closed stdout (broken pipe) stops quietly with exit 1. Tracebacks only with --debug or MLLMJAX_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mllmjax_cli import interrupts

        interrupts.install()
        sys.unraisablehook = _quiet_unraisable
        if not debug_enabled():  # Orbax's read futures, failed with the restore, are logged as "never retrieved"
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a closed stdout shows here, not as a traceback at interpreter exit
            return result
        except BrokenPipeError:
            # The reader of stdout went away (`mllmjax score -o - | head -n 1`): stop quietly, exit 1,
            # so that `set -o pipefail` sees the output was cut. Later flushes go to /dev/null.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(1) from None
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


_default_unraisablehook = sys.unraisablehook


def _quiet_unraisable(info: Any) -> None:
    """Drop what Orbax's asyncio machinery leaves behind after a failed restore (the `error:` line
    says what failed): `RuntimeError: Event loop is closed` from its callbacks at exit, and the
    exceptions of its read coroutines collected unawaited. Anything else is printed as usual."""
    code = getattr(info.object, "cr_code", None)
    from_orbax = code is not None and "orbax" in code.co_filename
    closed_loop = isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed"
    if not debug_enabled() and (from_orbax or closed_loop):
        return
    _default_unraisablehook(info)


def _one_line(message: str) -> str:
    return " ".join(message.split()) if message else "(no message)"
