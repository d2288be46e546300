"""The huge-page re-exec of the `mllmjax` entry point (mllmjax.runtime)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mllmjax import runtime


def _thp(tmp_path, mode):
    path = tmp_path / "enabled"
    if mode is not None:
        path.write_text(" ".join(f"[{m}]" if m == mode else m for m in ("always", "madvise", "never")) + "\n")
    return str(path)


@pytest.fixture
def glibc(monkeypatch):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime.sys, "platform", "linux")


def test_adds_the_tunable_under_madvise(glibc, tmp_path):
    madvise = _thp(tmp_path, "madvise")
    env = runtime.hugepage_environ({"PATH": "/bin"}, thp_path=madvise)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = runtime.hugepage_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp_path=madvise)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, mode",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise"),  # the user's own choice stands
        ({"MLLMJAX_HUGEPAGES": "0"}, "madvise"),
        ({}, "always"),  # huge pages already
        ({}, "never"),
        ({}, None),  # no THP at all
    ],
)
def test_leaves_the_process_alone(glibc, tmp_path, environ, mode):
    assert runtime.hugepage_environ(environ, thp_path=_thp(tmp_path, mode)) is None


def test_old_or_other_libc(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    for libc in [("glibc", "2.31"), ("", ""), ("musl", "1.2")]:
        monkeypatch.setattr(runtime.platform, "libc_ver", lambda libc=libc: libc)
        assert runtime.hugepage_environ({}, thp_path=_thp(tmp_path, "madvise")) is None


def test_reexec_runs_the_command_with_the_tunable(tmp_path):
    # A real exec: the child replaces a process that asked for the re-exec (on a machine where it
    # does not apply, the command runs in the same process unchanged, and prints what it had).
    code = (
        "import sys; from mllmjax.runtime import reexec_with_hugepages, hugepage_environ; import os;"
        "applies = hugepage_environ(os.environ) is not None;"
        "reexec_with_hugepages([sys.executable, '-c', 'import os; print(os.environ.get(\"GLIBC_TUNABLES\"))']);"
        "print('not re-executed', applies)"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.split()
    if lines[0] == "not":
        assert out.stdout.strip() == "not re-executed False"
    else:
        assert out.stdout.strip() == "glibc.malloc.hugetlb=1"
