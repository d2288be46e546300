"""Process settings that have to be in place before the process starts (so before jax is imported).

XLA:CPU allocates the large temporaries of every call of a compiled program (activations, gradients,
optimizer temporaries, logits) with malloc, afresh at each call, and glibc by default serves each of
them with a fresh mmap and unmaps it again on free. Every call then faults all of its memory back in,
one zero-filled page at a time. Two sets of glibc malloc tunables fix this:

- Huge pages (`glibc.malloc.hugetlb=1`; glibc >= 2.35, where the kernel gives transparent huge pages
  only on request: `/sys/kernel/mm/transparent_hugepage/enabled` is `[madvise]`, the common default):
  far fewer page faults while the heap grows.
- Keeping the heap (`glibc.malloc.arena_max=1`, `glibc.malloc.mmap_max=0`, a trim threshold of
  64 TiB; glibc >= 2.26): one arena grown with brk, no mmap for large blocks and no trimming, so a
  freed buffer stays in the process and the next call reuses it without faulting. It matters most
  after an idle spell, as when a GRPO step switches between sampling and training. The cost: the
  process keeps its peak memory until it exits instead of returning freed memory to the system, so
  the heap has to stay at one call's size. Two things keep it there:
  - Synchronous dispatch on the CPU (`sync_dispatch_if_asked`, after the launcher set
    MLLMJAX_SYNC_DISPATCH=1 with the heap tunables): with JAX's default asynchronous dispatch, a
    call's temporaries are freed a moment after its outputs are ready, so the next call, dispatched
    at once, allocates its own before the last one's are back and the heap grows. Inline, a call has
    freed everything when it returns. (JAX keeps calls over several devices asynchronous.)
  - Donated training state (`Trainer(donate=True)`, as `train` and `grpo` run it): without it every
    update allocates a whole new state, which breaks up the freed blocks and grows the heap.

The measurements behind these settings are in docs/benchmarks.md.

glibc reads tunables only at process start, so the `mllmjax` entry point (and the benchmarks, so that
they measure what users get) re-executes itself once with GLIBC_TUNABLES set. `MLLMJAX_HUGEPAGES=0`
leaves out the huge pages, `MLLMJAX_KEEP_HEAP=0` the heap settings and the synchronous dispatch
(`MLLMJAX_SYNC_DISPATCH=0` only the latter); a tunable that GLIBC_TUNABLES already names keeps the
user's value. Other C libraries are left alone.

The persistent compilation cache (`enable_compile_cache`, also before the first compilation): every
command compiles the same XLA programs for the same model and shapes each time it runs, which is most
of a short command's wall time (a batch-64 decode bucket alone takes over 30 s to compile here). JAX's
disk cache keeps them under `cache_dir()/xla` (MLLMJAX_CACHE moves the whole cache; MLLMJAX_COMPILE_CACHE=0
or `mllmjax --no-compile-cache` turns it off), bounded to COMPILE_CACHE_MAX_BYTES by evicting the least
recently used programs. With a size bound JAX reads and writes entries under a file lock, so concurrent
commands share one cache safely; in a multi-host run only process 0 writes (JAX's rule) and every
process reads. A JAX_COMPILATION_CACHE_DIR the user set is left in charge. Beside it, under
`cache_dir()/programs`, the sampler's programs are kept whole (`mllmjax.aot`), so that a later command
skips their tracing and lowering as well; it is on exactly when the cache above is ours.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGEPAGE_TUNABLES = {"glibc.malloc.hugetlb": "1"}
KEEP_HEAP_TUNABLES = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 46),
}
# Set beside the heap tunables: `sync_dispatch_if_asked` then runs single-device CPU calls inline.
SYNC_DISPATCH_VAR = "MLLMJAX_SYNC_DISPATCH"
COMPILE_CACHE_VAR = "MLLMJAX_COMPILE_CACHE"  # 0 / off / false: no persistent compilation cache
COMPILE_CACHE_MAX_BYTES = 4 << 30


def _thp_mode(path: str = _THP_MODE) -> str | None:
    """The kernel's THP mode ('always', 'madvise', 'never'), or None where it cannot be read."""
    try:
        text = open(path).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _glibc_version() -> tuple[int, int] | None:
    libc, version = platform.libc_ver()
    if libc != "glibc" or not sys.platform.startswith("linux"):
        return None
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def malloc_environ(environ: Mapping[str, str], *, thp_path: str = _THP_MODE) -> dict[str, str] | None:
    """The environment to re-execute with (GLIBC_TUNABLES extended, and with the kept heap
    MLLMJAX_SYNC_DISPATCH=1), or None when nothing is to add."""
    glibc = _glibc_version()
    if glibc is None:
        return None
    wanted: dict[str, str] = {}
    keep_heap = environ.get("MLLMJAX_KEEP_HEAP", "1") != "0" and glibc >= (2, 26)
    if keep_heap:
        wanted.update(KEEP_HEAP_TUNABLES)
    if environ.get("MLLMJAX_HUGEPAGES", "1") != "0" and glibc >= (2, 35) and _thp_mode(thp_path) == "madvise":
        wanted.update(HUGEPAGE_TUNABLES)
    tunables = environ.get("GLIBC_TUNABLES", "")
    named = {item.split("=", 1)[0] for item in tunables.split(":") if item}
    added = [f"{name}={value}" for name, value in wanted.items() if name not in named]
    variables = {SYNC_DISPATCH_VAR: "1"} if keep_heap and SYNC_DISPATCH_VAR not in environ else {}
    if not added and not variables:
        return None
    env = {**environ, **variables}
    if added:
        env["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + added)
    return env


def reexec_with_malloc_tuning(argv: Sequence[str]) -> None:
    """Replace this process with `argv` run under `malloc_environ`, if that adds anything.

    argv: the full command line to run (argv[0] an executable, e.g. [sys.executable, "-m", module]).
    Returns only when nothing is to be done or the exec failed (the process then goes on unchanged).
    The child's environment names every tunable it wants, so it does not re-execute again.
    """
    env = malloc_environ(os.environ)
    if env is None:
        return
    try:
        os.execve(argv[0], list(argv), env)
    except OSError:
        return


def keeps_heap(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process runs on the kept malloc heap (`KEEP_HEAP_TUNABLES`, set by the launcher's
    re-exec or by hand): a freed buffer then stays in the process for the next allocation."""
    named = dict(item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    return named.get("glibc.malloc.mmap_max") == "0"


def sync_dispatch_if_asked(environ: Mapping[str, str] = os.environ) -> bool:
    """Make JAX run single-device CPU calls inline when MLLMJAX_SYNC_DISPATCH=1 (the launcher sets it
    beside the kept heap's tunables). It takes effect only before JAX creates its CPU client, so the
    entry points call it first. Returns whether it did."""
    if environ.get(SYNC_DISPATCH_VAR) != "1":
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where mllmjax caches what it derives (converted models, compiled programs): MLLMJAX_CACHE, or
    ~/.cache/mllmjax."""
    return Path(environ.get("MLLMJAX_CACHE") or Path.home() / ".cache" / "mllmjax")


def compile_cache_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The persistent compilation cache's directory, or None when MLLMJAX_COMPILE_CACHE turns it off."""
    if environ.get(COMPILE_CACHE_VAR, "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    return cache_dir(environ) / "xla"


# JAX's settings of the cache: every program is kept (the small ones are most of a command's count and
# still cost a compile each), and the directory is bounded (which also makes JAX lock its entries).
_JAX_CACHE_SETTINGS = {
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
    "jax_compilation_cache_max_size": COMPILE_CACHE_MAX_BYTES,
}


def enable_compile_cache(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Turn on JAX's persistent compilation cache (see the module docstring); returns its directory,
    or None when it is off. Before jax is imported it sets JAX's environment variables, so a command
    that never loads jax (`score`) pays nothing; after, it updates jax.config, which takes effect if
    nothing was compiled yet."""
    from mllmjax import aot

    aot.enable(None)
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(environ["JAX_COMPILATION_CACHE_DIR"])
    path = compile_cache_dir(environ)
    if path is None:
        return None
    aot.enable(path.parent / "programs")
    settings = {"jax_compilation_cache_dir": str(path), **_JAX_CACHE_SETTINGS}
    if "jax" in sys.modules:
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)
    else:
        for name, value in settings.items():
            os.environ[name.upper()] = str(value)
    return path
