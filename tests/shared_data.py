"""The repository's ../shared data for tests that read it: absent, they skip loudly (or fail in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def require_shared(path: Path) -> Path:
    """`path` (a file or folder under ../shared) if it exists; otherwise the test skips and says where it
    looked, or fails where MLLMJAX_REQUIRE_SHARED=1 says that the shared data must be there."""
    if path.exists():
        return path
    reason = f"shared data not found at {path.resolve()} (the repository's ../shared)"
    if os.environ.get("MLLMJAX_REQUIRE_SHARED") == "1":
        pytest.fail(f"{reason}, and MLLMJAX_REQUIRE_SHARED=1 requires it")
    pytest.skip(reason)
