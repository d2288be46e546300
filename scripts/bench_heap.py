"""What the kept heap and synchronous dispatch (mllmjax.runtime) save, in numbers that depend on the
kernel and its huge-page mode, so they are measured here rather than asserted in tests
(tests/test_runtime.py checks the allocator's and JAX's behaviour behind them).

- Page faults: allocating, touching and freeing the same 64 MiB ten times, in a child with the heap
  tunables (the block stays in the heap: budget < 100 faults) and with glibc's defaults (the block is
  unmapped at each free and faulted in again: expected > 10,000 faults of 4 KiB, unless the kernel's
  THP mode is 'always', where a round takes ~32 faults).
- RSS: a jitted call with a 256 MiB temporary run 30 times back to back in a child with the tunables
  and MLLMJAX_SYNC_DISPATCH=1: the peak RSS grows by at most one call's temporary after the warm-up
  calls (dispatched asynchronously, it grew 0.25-1.5 GiB).

    python scripts/bench_heap.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT)]

from mllmjax import runtime  # noqa: E402

HEAP = ":".join(f"{name}={value}" for name, value in runtime.KEEP_HEAP_TUNABLES.items())

FAULTS = (
    "import ctypes, resource\n"
    "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
    "def round_():\n"
    "    p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(ctypes.c_void_p(p))\n"
    "round_()\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "for _ in range(10): round_()\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
)

GROWTH = (
    "import resource\n"
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


def _child(code: str, **env_extra: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "lib"), str(ROOT)]), **env_extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return [int(x) for x in out.stdout.split()]


def main() -> None:
    glibc = runtime._glibc_version()
    if glibc is None or glibc < (2, 26):
        print(f"glibc >= 2.26 only (here: {glibc}): nothing to measure")
        return
    thp = runtime._thp_mode()
    print(f"glibc {glibc[0]}.{glibc[1]}, THP mode {thp}, tunables {HEAP}")
    ok = True
    [kept] = _child(FAULTS, GLIBC_TUNABLES=HEAP)
    ok &= kept < 100
    print(
        f"page faults, 10 rounds of 64 MiB, kept heap: {kept} (budget < 100){'' if kept < 100 else '  OVER'}"
    )
    [default] = _child(FAULTS)
    expect = "~320 with THP 'always'" if thp == "always" else "expected > 10000"
    low = thp != "always" and default <= 10_000
    print(f"page faults, 10 rounds of 64 MiB, glibc defaults: {default} ({expect}){'  LOW' if low else ''}")
    temp, growth = _child(GROWTH, GLIBC_TUNABLES=HEAP, MLLMJAX_SYNC_DISPATCH="1")
    ok &= growth <= temp
    print(
        f"peak RSS growth over 30 calls, kept heap + sync dispatch: {growth / 2**20:.0f} MiB "
        f"(budget: one call's temporary, {temp / 2**20:.0f} MiB){'' if growth <= temp else '  OVER'}"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
