"""Test-only signal injection: the hostile-input tests interrupt a command at a named point.

With MLLMJAX_SIGNAL_AT=NAME:SIG[:HOLD] set (SIG is INT or TERM, or INTx3 for three of them,
sent from another thread once the hold has begun),
`signal_point(NAME)` sends SIG to this process and then holds the main thread where it is, as a long computation would: HOLD is a number
of seconds to sleep (default 60; 0 does not hold), or `xla` to spin in a compiled loop that never
returns, which shows that an interrupt does not wait for XLA. Points: loaded (parameters restored),
sampling (before a batch is decoded), update (before a training update), write (a records file written
to its temp file, before the rename), rename (a checkpoint or export written to its temp dir, before
the rename). Unset, a point does nothing. (The kill -9 points of `grpo` are `grpo.faults`.)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

SIGNAL_ENV = "MLLMJAX_SIGNAL_AT"


def signal_point(name: str) -> None:
    target = os.environ.get(SIGNAL_ENV)
    if not target:
        return
    point, sig, *rest = target.split(":") + [""]
    if point != name:
        return
    os.environ.pop(SIGNAL_ENV)  # once per process
    signame, _, times = sig.partition("x")
    signum = getattr(signal, f"SIG{signame}")
    if int(times or 1) == 1:
        os.kill(os.getpid(), signum)
    else:  # from a thread, a second after the hold began: the main thread is then inside it
        def send() -> None:
            time.sleep(1.0)
            for _ in range(int(times)):
                os.kill(os.getpid(), signum)
                time.sleep(0.05)

        threading.Thread(target=send, daemon=True).start()
    hold = rest[0] or "60"
    if hold == "xla":
        _spin_compiled()
    elif float(hold) > 0:
        deadline = time.monotonic() + float(hold)
        while time.monotonic() < deadline:
            time.sleep(0.05)


def _spin_compiled() -> None:
    if "jax" not in sys.modules:
        raise RuntimeError(f"{SIGNAL_ENV}=...:xla needs a point reached after jax is imported")
    import jax
    import jax.numpy as jnp

    def body(c: tuple) -> tuple:
        i, x = c
        return (i + 1) % 1024, x * 1.0000001 + 1e-9

    # i stays in [0, 1024): the loop runs until the process is stopped.
    spin = jax.jit(lambda x: jax.lax.while_loop(lambda c: c[0] >= 0, body, (jnp.int32(0), x))[1])
    jax.block_until_ready(spin(jnp.float32(1.0)))
