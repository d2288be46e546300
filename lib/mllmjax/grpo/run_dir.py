"""The run directory: config.json, metrics.jsonl and checkpoints/step_N, read and written atomically."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from mllmjax.errors import ArtifactError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)


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
