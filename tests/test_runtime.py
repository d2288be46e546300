"""The huge-page re-exec of the `mllmjax` entry point (mllmjax.runtime)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
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


HEAP = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=70368744177664"


def test_adds_the_tunables_under_madvise(glibc, tmp_path):
    madvise = _thp(tmp_path, "madvise")
    env = runtime.malloc_environ({"PATH": "/bin"}, thp_path=madvise)
    assert env == {
        "PATH": "/bin", "GLIBC_TUNABLES": f"{HEAP}:glibc.malloc.hugetlb=1", "MLLMJAX_SYNC_DISPATCH": "1"
    }  # fmt: skip
    # a tunable the user named keeps the user's value; the others are appended
    env = runtime.malloc_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp_path=madvise)
    assert env["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=70368744177664"
        ":glibc.malloc.hugetlb=1"
    )


@pytest.mark.parametrize(
    "environ, mode, expected",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", f"glibc.malloc.hugetlb=0:{HEAP}"),
        ({"MLLMJAX_HUGEPAGES": "0"}, "madvise", HEAP),
        ({}, "always", HEAP),  # huge pages already
        ({}, "never", HEAP),
        ({}, None, HEAP),  # no THP at all
        ({"MLLMJAX_KEEP_HEAP": "0"}, "madvise", "glibc.malloc.hugetlb=1"),
        ({"MLLMJAX_KEEP_HEAP": "0"}, "never", None),
        ({"MLLMJAX_KEEP_HEAP": "0", "MLLMJAX_HUGEPAGES": "0"}, "madvise", None),
        # the re-executed child
        ({"GLIBC_TUNABLES": f"{HEAP}:glibc.malloc.hugetlb=1", "MLLMJAX_SYNC_DISPATCH": "1"}, "madvise", None),
    ],
)
def test_switches_and_the_users_own_tunables(glibc, tmp_path, environ, mode, expected):
    env = runtime.malloc_environ(environ, thp_path=_thp(tmp_path, mode))
    assert (env and env["GLIBC_TUNABLES"]) == expected


def test_the_kept_heap_asks_for_synchronous_dispatch(glibc, tmp_path):
    madvise = _thp(tmp_path, "madvise")
    assert runtime.malloc_environ({}, thp_path=madvise)["MLLMJAX_SYNC_DISPATCH"] == "1"
    assert "MLLMJAX_SYNC_DISPATCH" not in runtime.malloc_environ({"MLLMJAX_KEEP_HEAP": "0"}, thp_path=madvise)
    # the user's own choice stays; with every tunable named too there is nothing to re-execute for
    env = runtime.malloc_environ({"MLLMJAX_SYNC_DISPATCH": "0"}, thp_path=madvise)
    assert env["MLLMJAX_SYNC_DISPATCH"] == "0"
    done = {"GLIBC_TUNABLES": f"{HEAP}:glibc.malloc.hugetlb=1", "MLLMJAX_SYNC_DISPATCH": "0"}
    assert runtime.malloc_environ(done, thp_path=madvise) is None
    # only the variable missing (tunables the user set by hand): re-execute to add it
    env = runtime.malloc_environ({"GLIBC_TUNABLES": f"{HEAP}:glibc.malloc.hugetlb=1"}, thp_path=madvise)
    assert env["MLLMJAX_SYNC_DISPATCH"] == "1"


def test_old_or_other_libc(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    madvise = _thp(tmp_path, "madvise")
    for libc in [("glibc", "2.25"), ("", ""), ("musl", "1.2")]:
        monkeypatch.setattr(runtime.platform, "libc_ver", lambda libc=libc: libc)
        assert runtime.malloc_environ({}, thp_path=madvise) is None
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.31"))  # heap only: no hugetlb
    assert runtime.malloc_environ({}, thp_path=madvise)["GLIBC_TUNABLES"] == HEAP


def test_reexec_runs_the_command_with_the_tunables(tmp_path):
    # A real exec: the child replaces a process that asked for the re-exec (on a machine where it
    # does not apply, the command runs in the same process unchanged, and prints what it had).
    code = (
        "import sys; from mllmjax.runtime import reexec_with_malloc_tuning, malloc_environ; import os;"
        "env = malloc_environ(os.environ);"
        "print(env['GLIBC_TUNABLES'] if env else 'none', flush=True);"
        "reexec_with_malloc_tuning([sys.executable, '-c', 'import os; print(os.environ.get(\"GLIBC_TUNABLES\"))']);"
        "print('not re-executed')"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    wanted, got = out.stdout.split()
    if wanted == "none":
        assert got == "not"
    else:
        assert got == wanted and HEAP in got


def test_the_kept_heap_keeps_a_freed_block_for_reuse():
    # The allocator's state, in a child run with the tunables: a 64 MiB block comes from the heap
    # (not its own mapping) and stays in the heap, free, once freed, so the next call's buffer reuses
    # pages already faulted in. glibc's default maps such a block on its own and unmaps it at free.
    # (The page faults and RSS this saves depend on the kernel and its huge-page mode: they are
    # scripts/bench_heap.py's numbers, not a test's.)
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd',\n"
        "                'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc.mallinfo2.restype = Info\n"
        "p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); held = libc.mallinfo2()\n"
        "libc.free(ctypes.c_void_p(p)); freed = libc.mallinfo2()\n"
        "print(held.hblkhd, freed.arena, freed.fordblks)\n"
    )

    def state(tunables: str | None) -> tuple[int, ...]:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        return tuple(int(x) for x in out.stdout.split())

    if runtime._glibc_version() is None or runtime._glibc_version() < (2, 33):
        pytest.skip("glibc >= 2.33 only (mallinfo2)")
    block = 64 << 20
    mapped, heap, free = state(HEAP)
    assert mapped == 0 and heap >= block and free >= block, (mapped, heap, free)
    mapped, heap, free = state(None)
    assert mapped >= block and heap < block and free < block, (mapped, heap, free)


def test_synchronous_dispatch_runs_each_call_inline():
    # In a child with MLLMJAX_SYNC_DISPATCH=1: JAX's CPU calls run inline, so each call's result is
    # ready (and its temporaries freed) when the call returns, before the next call allocates its
    # own; that keeps the kept heap at one call's size (the RSS it saves, which depends on the
    # kernel, is scripts/bench_heap.py's number). Without the variable nothing changes.
    code = (
        "from mllmjax.runtime import sync_dispatch_if_asked\n"
        "asked = sync_dispatch_if_asked()\n"
        "import jax, jax.numpy as jnp\n"
        "x = jnp.ones((1024, 1024))\n"
        "f = jax.jit(lambda x: jnp.cos(jnp.sin(x) @ x) @ x)\n"
        "ready = sum(f(x).is_ready() for _ in range(10))\n"
        "print(asked, jax.config.read('jax_cpu_enable_async_dispatch'), ready)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(MLLMJAX_SYNC_DISPATCH="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["True", "False", "10"]
    before = jax.config.read("jax_cpu_enable_async_dispatch")
    for environ in ({}, {"MLLMJAX_SYNC_DISPATCH": "0"}):
        assert runtime.sync_dispatch_if_asked(environ) is False
    assert jax.config.read("jax_cpu_enable_async_dispatch") == before
