"""Temp files and directories that an interrupted command must not leave behind.

Every writer of an output (records, checkpoints, exports, run files, the tokenizer staging of
`convert`) registers its temp path here (`temp_file` for files, `register` for directories) until it
is renamed into place or deleted. The CLI's signal watcher (`mllmjax_cli.interrupts`) stops a command at
once, from another thread, while the main thread may be inside a long compiled call: it calls
`remove_all()` and exits, so no `finally` of the main thread runs. `critical()` marks the few renames
that must not be cut in the middle (an old checkpoint moved aside, the new one renamed in): the
watcher waits for them to finish before it removes anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

_lock = threading.RLock()  # held by critical sections and by remove_all
_paths: dict[str, str] = {}  # registered path -> "file", "dir" (a temp tree) or "parent" (remove if empty)


def register(path: str | os.PathLike[str], kind: str) -> None:
    with _lock:
        _paths[os.fspath(path)] = kind


def unregister(path: str | os.PathLike[str]) -> None:
    with _lock:
        _paths.pop(os.fspath(path), None)


def remove(path: str | os.PathLike[str]) -> None:
    """Delete a registered temp path (whatever is left of it) and forget it."""
    with _lock:
        kind = _paths.pop(os.fspath(path), "file")
        _delete(os.fspath(path), kind)


def _delete(path: str, kind: str) -> None:
    if kind == "dir":
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path, ignore_errors=True)  # a file the main thread was still creating
    elif kind == "parent":
        with contextlib.suppress(OSError):
            os.rmdir(path)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def remove_all() -> list[str]:
    """Delete every registered temp path (waiting for a critical section to end); return them."""
    with _lock:
        removed = list(_paths)
        # Newest first: temp trees and files before the parent directories made for them.
        for path, kind in reversed(list(_paths.items())):
            _delete(path, kind)
        _paths.clear()
        return removed


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Renames that must finish together: an interrupt that arrives meanwhile acts after them."""
    with _lock:
        yield


def check_output(out: str | os.PathLike[str], force: bool, *, probe: bool = True, file: bool = False) -> None:
    """Fail early (before any work): OUT exists and --force was not given, OUT is a directory where a
    file is written (`file`), or nothing can be created where OUT goes (`probe`: a file is created
    and removed in the nearest existing folder above OUT, which also catches read-only mounts)."""
    from mllmjax.errors import BadInputError, OutputExistsError

    out = Path(out)
    if file and out.is_dir():
        raise OutputExistsError(f"{out} is a directory; give a file name for the output")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if not probe:
        return
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise BadInputError(f"cannot write {out}: {folder} is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".mllmjax-probe-", dir=folder)
    except OSError as e:
        raise BadInputError(f"cannot write {out}: {e.strerror} ({folder})") from None
    os.close(fd)
    os.unlink(name)


def file_mode() -> int:
    """The mode a new file gets under the current umask (mkstemp's 0600 is not what users expect)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode a new directory gets under the current umask (mkdtemp's 0700, copied onto an output
    by copytree, is not what users expect)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def temp_file(directory: str | os.PathLike[str], name: str) -> Iterator[tuple[int, Path]]:
    """(fd, path) of a new registered temp file `.NAME.*.tmp` in `directory`, with the umask's mode.
    Removed on any exception; the caller renames it into place (then it is forgotten)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    register(tmp, "file")
    try:
        os.fchmod(fd, file_mode())
        yield fd, Path(tmp)
    except BaseException:
        remove(tmp)
        raise
    else:
        unregister(tmp)


@contextlib.contextmanager
def parents_of(path: str | os.PathLike[str]) -> Iterator[None]:
    """Create the missing parent directories of an output (as `mkdir -p`); if the command fails or is
    interrupted before the output is in place, remove the ones made here again (when empty)."""
    made: list[Path] = []
    parent = Path(path).absolute().parent
    while not parent.exists():
        made.append(parent)
        parent = parent.parent
    for d in reversed(made):
        register(d, "parent")
        try:
            d.mkdir()
        except FileExistsError:
            unregister(d)
        except OSError as e:
            _undo(made)
            from mllmjax.errors import BadInputError

            raise BadInputError(f"cannot create the directory {d} for the output {path}: {e.strerror}") from e
    if not made and not parent.is_dir():
        from mllmjax.errors import BadInputError

        raise BadInputError(f"{parent} is not a directory; cannot write the output {path} there")
    try:
        yield
    except BaseException:
        _undo(made)
        raise
    else:
        for d in made:
            unregister(d)


def _undo(made: list[Path]) -> None:
    for d in made:  # deepest first
        unregister(d)
        _delete(os.fspath(d), "parent")
