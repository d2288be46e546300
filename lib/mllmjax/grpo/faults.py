"""Test-only fault injection: the kill tests stop a run at a named point to check exact resume.

The loop calls `faults.crash_point(NAME, STEP)` (through the module, so a test can monkeypatch it) at:
rollout (sampled and scored, before training), update (after each PPO update), metrics (after the
metrics line, before the checkpoint) and checkpoint (mid-write, before the rename). With
MLLMJAX_CRASH_AT=NAME@STEP set, that point kills the process with SIGKILL; unset, it does nothing.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "MLLMJAX_CRASH_AT"


def crash_point(name: str, step: int) -> None:
    """SIGKILL this process if MLLMJAX_CRASH_AT names this point and step."""
    target = os.environ.get(CRASH_ENV)
    if target and target == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
