"""One error hierarchy for the library.

Every error carries a message a user can act on. The CLI catches `MllmjaxError` in one place, prints
the message on one line and exits with `exit_code`: 2 for bad input (a wrong flag value, a file that is
not what it claims to be), 1 for failures at run time. User text files are decoded here too
(`decode_utf8`, `utf8_lines`), so that bytes that are not UTF-8 are bad input naming file and line.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class MllmjaxError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = 1


class BadInputError(MllmjaxError):
    """The user gave us something we cannot use (exit 2)."""

    exit_code = 2


class UnsupportedModelError(BadInputError):
    """An architecture or model option we do not implement."""


class WeightsError(BadInputError):
    """A source tensor is missing, unexpected, corrupt or of the wrong shape."""


class ArtifactError(BadInputError):
    """A checkpoint or record file is not in the format (or version) we expected."""


class OutputExistsError(BadInputError):
    """The output path exists and --force was not given."""


class RecordError(BadInputError):
    """A bad line in a JSON Lines file; the message names the file and the line."""

    def __init__(self, path: str, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path = path
        self.line = line


class NotBuiltError(BadInputError):
    """A command that is named in the CLI but not built yet."""


class RuntimeFailure(MllmjaxError):
    """Something went wrong while running (exit 1)."""


def decode_utf8(data: bytes, source: str) -> str:
    """`data` as text; bytes that are not UTF-8 are a RecordError naming `source` and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecordError(source, line, f"not UTF-8 text ({e.reason})") from None


def utf8_lines(lines: Iterable[bytes], source: str) -> Iterator[str]:
    """Decode a binary stream line by line (a JSON Lines reader's input) like `decode_utf8`."""
    for number, raw in enumerate(lines, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(source, number, f"not UTF-8 text ({e.reason})") from None
