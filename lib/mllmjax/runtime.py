"""Process settings that have to be in place before the process starts (so before jax is imported).

Transparent huge pages for malloc. XLA:CPU allocates its large temporaries (activations, gradients,
optimizer temporaries, logits) with malloc, and glibc serves them with fresh mmaps: every first touch
of every 4 KiB page is a page fault that the kernel zero-fills. One training update of SmolLM2-135M
(8 x 256 tokens) took 1.58 million faults and 4.7 s of kernel time on 2 cores. Where the kernel gives
huge pages only on request (`/sys/kernel/mm/transparent_hugepage/enabled` is `[madvise]`, the
common default), glibc >= 2.35 requests them with the tunable `glibc.malloc.hugetlb=1`: the same
update then takes about 30 thousand faults and 2.3 s of kernel time, and runs 10-15% faster.

glibc reads tunables only at process start, so the `mllmjax` entry point (and the benchmarks, so that
they measure what users get) re-executes itself once with the tunable set. `MLLMJAX_HUGEPAGES=0`
turns this off; a GLIBC_TUNABLES that already names the tunable is left as it is. Other C libraries
and kernels that give huge pages always (or never) are left alone.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

_TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = _THP_MODE) -> str | None:
    """The kernel's THP mode ('always', 'madvise', 'never'), or None where it cannot be read."""
    try:
        text = open(path).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def hugepage_environ(environ: Mapping[str, str], *, thp_path: str = _THP_MODE) -> dict[str, str] | None:
    """The environment to re-execute with so malloc uses huge pages, or None when there is nothing to do."""
    if environ.get("MLLMJAX_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    libc, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    if libc != "glibc" or (major, minor) < (2, 35):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if _TUNABLE in tunables:
        return None
    if _thp_mode(thp_path) != "madvise":
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{_TUNABLE}=1" if tunables else f"{_TUNABLE}=1"
    return env


def reexec_with_hugepages(argv: Sequence[str]) -> None:
    """Replace this process with `argv` run under the huge-page environment, if that applies.

    argv: the full command line to run (argv[0] an executable, e.g. [sys.executable, "-m", module]).
    Returns only when nothing is to be done or the exec failed (the process then goes on unchanged).
    """
    env = hugepage_environ(os.environ)
    if env is None:
        return
    try:
        os.execve(argv[0], list(argv), env)
    except OSError:
        return
