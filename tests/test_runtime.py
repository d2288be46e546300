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


def test_the_kept_heap_takes_no_page_faults_on_reuse():
    # The effect itself, in a child run with the tunables: allocating, touching and freeing the same
    # 64 MiB ten times faults its pages in once; glibc's default unmaps the block at every free and
    # faults it all in again (16 K faults of 4 KiB per round without huge pages).
    code = (
        "import ctypes, resource\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
        "def round_():\n"
        "    p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(ctypes.c_void_p(p))\n"
        "round_()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10): round_()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )

    def faults(tunables: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        return int(out.stdout)

    if runtime._glibc_version() is None or runtime._glibc_version() < (2, 26):
        pytest.skip("glibc >= 2.26 only")
    assert faults(HEAP) < 100
    if runtime._thp_mode() != "always":  # (where every mmap gets huge pages, a round takes 32 faults)
        assert faults(None) > 10 * 1000  # 10 rounds of 64 MiB, each faulted in again


def test_synchronous_dispatch_keeps_the_heap_at_one_calls_size():
    # A jitted call with a 256 MiB temporary, run back to back 30 times in a child with the heap
    # tunables: inline dispatch frees each call's temporary before the next call allocates its own,
    # so the heap stops growing after the warm-up calls. (Dispatched asynchronously, the next call's
    # temporary often came before the last one's was freed: the heap grew 0.25-1.5 GiB in 30 calls.)
    code = (
        "import resource, sys\n"
        "from mllmjax.runtime import sync_dispatch_if_asked\n"
        "assert sync_dispatch_if_asked()\n"
        "import jax, jax.numpy as jnp\n"
        "x, v = jnp.ones((4096, 8192)), jnp.ones((8192, 16))\n"
        "f = jax.jit(lambda x, v: (jnp.cos(jnp.sin(x) * 2.0).T.T @ v)[:4] + ((jnp.sin(x) * 2.0) @ v)[:4])\n"
        "temp = f.lower(x, v).compile().memory_analysis().temp_size_in_bytes\n"
        "for _ in range(3): f(x, v).block_until_ready()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "for _ in range(30): f(x, v).block_until_ready()\n"
        "print(temp, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)\n"
    )
    if runtime._glibc_version() is None or runtime._glibc_version() < (2, 26):
        pytest.skip("glibc >= 2.26 only")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    env.update(GLIBC_TUNABLES=HEAP, MLLMJAX_SYNC_DISPATCH="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    temp, growth = (int(x) for x in out.stdout.split())
    assert temp >= 128 << 20  # the call does have a large temporary
    assert growth <= temp, (temp, growth)
