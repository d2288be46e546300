"""The run directory: config.json, metrics.jsonl, checkpoints/step_N, rollouts/ and plots/.

Every write that a crash could tear is atomic: files go through a temp file and a rename, checkpoints
through a hidden temp dir (see `mllmjax.checkpoint.write_checkpoint`), and old checkpoints are renamed
to a hidden trash name before they are deleted. So a crash leaves whole files and whole step_N dirs,
and the hidden leftovers are removed on resume. In a multi-host run only the primary process writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllmjax.errors import ArtifactError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ROLLOUTS = "rollouts"
PLOTS = "plots"
RUN_FORMAT = "mllmjax.grpo-run/1"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps with a whole checkpoint in RUN/checkpoints (temp and trash dirs are never matched)."""
    from mllmjax.checkpoint import META_FILE

    root = run_dir / CHECKPOINTS
    steps = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / META_FILE).is_file() and (d / "opt_state").is_dir():
                steps.append(int(m.group(1)))
    return sorted(steps)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """RUN/config.json as written when the run started (ArtifactError if missing or of another format)."""
    f = run_dir / CONFIG_FILE
    if not f.is_file():
        raise ArtifactError(f"{run_dir} is not a grpo run directory (no {CONFIG_FILE})")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{f}: unreadable: {e}") from e
    if raw.get("format") != RUN_FORMAT:
        raise ArtifactError(f"{f}: format {raw.get('format')!r}, expected {RUN_FORMAT!r}")
    return raw


def read_metrics(run_dir: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl as dicts (a torn last line from a crash is skipped), optionally steps <= upto."""
    f = run_dir / METRICS_FILE
    rows = []
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and (upto is None or row.get("step", 0) <= upto):
                rows.append(row)
    return rows


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` whole: a reader sees the old file or the new one, never a mix."""
    from mllmjax.records import write_text_atomic

    write_text_atomic(path, text)


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The files of one run. `primary` is False on the other processes of a multi-host run, which
    read the directory but never write it."""

    path: Path
    primary: bool = True

    def checkpoint(self, step: int) -> Path:
        return self.path / CHECKPOINTS / f"step_{step}"

    def checkpoint_steps(self) -> list[int]:
        return checkpoint_steps(self.path)

    def read_metrics(self, upto: int | None = None) -> list[dict[str, Any]]:
        return read_metrics(self.path, upto)

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    def remove(self) -> None:
        """Delete the directory (a fresh run over an old one, with --force)."""
        if self.primary and self.path.exists():
            shutil.rmtree(self.path)

    def create(self, config: dict[str, Any]) -> None:
        """Start a fresh run: config.json with every resolved setting and an empty metrics.jsonl."""
        if not self.primary:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / CONFIG_FILE, json.dumps({"format": RUN_FORMAT, **config}, indent=2) + "\n")
        (self.path / METRICS_FILE).touch()

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One step's line, flushed to disk before the step counts as done."""
        if not self.primary:
            return
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite_metrics(self, rows: Sequence[dict[str, Any]]) -> None:
        """metrics.jsonl cut back to `rows`: the lines of the steps the parameters contain."""
        if self.primary:
            write_atomic(self.path / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in rows))

    def rollouts_file(self, step: int) -> Path:
        """Where a step's scored records go (the folder is made on the primary process)."""
        folder = self.path / ROLLOUTS
        if self.primary:
            folder.mkdir(exist_ok=True)
        return folder / f"step_{step}.jsonl"

    def clean_partial(self) -> None:
        """Remove the hidden temp and trash dirs that a crash mid-write or mid-delete leaves."""
        root = self.path / CHECKPOINTS
        if root.is_dir() and self.primary:
            for d in root.iterdir():
                if d.name.startswith("."):
                    shutil.rmtree(d, ignore_errors=True)

    def prune(self, keep: int) -> None:
        """Delete all but the newest `keep` checkpoints."""
        if not self.primary:
            return
        root = self.path / CHECKPOINTS
        for old in self.checkpoint_steps()[:-keep]:
            trash = root / f".trash-step_{old}-{uuid.uuid4().hex[:6]}"
            os.replace(self.checkpoint(old), trash)  # a whole step_N or none: never a half-deleted one
            shutil.rmtree(trash, ignore_errors=True)
