"""Ctrl-C and SIGTERM: stop at once, remove temp files, exit 130 / 143.

A command spends most of its time inside compiled XLA calls, where Python signal handlers do not run
(Python runs them only between bytecodes of the main thread), and unwinding a KeyboardInterrupt
through JAX's runtime at exit is where a crash in teardown comes from. So the signal is not handled in
the main thread: `signal.set_wakeup_fd` makes the C-level handler write the signal number to a pipe,
and a watcher thread that blocks on that pipe wakes at once (XLA releases the GIL while it computes),
removes every registered temp path (`mllmjax.cleanup`, after any critical rename finished), prints
`interrupted` and ends the process with `os._exit(128 + signum)`: no teardown, no traceback.

`grpo` stops gracefully instead (`graceful()`): its own main-thread handler finishes the step and
writes a checkpoint on the first signal and abandons the step on the second; the watcher only counts,
and acts on a third signal, for a run that does not come back from a compiled call.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_installed = False
_graceful = 0  # > 0 inside graceful(): the watcher only counts signals
_count = 0
_exiting = threading.Lock()


def exit_code(signum: int) -> int:
    return 128 + signum


def install() -> None:
    """Route SIGINT/SIGTERM to the watcher (main thread only; once per process)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for sig in SIGNALS:
        # A Python-level handler must be set for the wakeup fd to be written; it does nothing itself
        # (no KeyboardInterrupt racing the watcher in the main thread).
        signal.signal(sig, _ignore)
    threading.Thread(target=_watch, args=(read_fd,), name="mllmjax-interrupts", daemon=True).start()
    _installed = True


def _ignore(signum: int, frame: object) -> None:
    pass


def _watch(read_fd: int) -> None:
    global _count
    while True:
        data = os.read(read_fd, 64)
        for signum in data:
            if signum not in SIGNALS:
                continue
            _count += 1
            if not _graceful or _count >= 3:
                stop(signum)


def stop(signum: int) -> None:
    """Remove the temp paths, say so, and end the process now (from any thread)."""
    from mllmjax import cleanup

    if not _exiting.acquire(blocking=False):
        return  # another thread is already ending the process
    try:
        cleanup.remove_all()
        if sys.stderr.isatty():
            sys.stderr.write("\x1b[?25h\n")  # a live progress display may have hidden the cursor
        sys.stderr.write("interrupted\n" if signum == signal.SIGINT else "terminated\n")
        sys.stderr.flush()
    finally:
        os._exit(exit_code(signum))


@contextmanager
def graceful(handler: object) -> Iterator[None]:
    """Let `handler(signum, frame)` (run in the main thread) decide what SIGINT/SIGTERM mean;
    a third signal still ends the process at once."""
    global _graceful, _count
    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}  # type: ignore[arg-type]
    _graceful += 1
    _count = 0
    try:
        yield
    finally:
        _graceful -= 1
        for sig, h in previous.items():
            signal.signal(sig, h)
