"""XLA_FLAGS of the test processes and of the commands the tests run.

Besides the fake CPU devices, LLVM runs at -O0 (`--xla_backend_optimization_level=0`): most of the
suite's time is XLA compiling programs of tiny models, and -O0 cuts a command test's compile time by
a third (the Gemma 2 command test: 37.5 s of compiling -> 26 s, 67 s -> 53 s in all). The programs
compute the same (no fast-math at either level; the same HLO), and the tests on the real SmolLM2,
whose time is running the programs, ran no slower (62 s -> 59 s), measured 2026-12-07. Users' runs
keep XLA's default."""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a process with `devices` fake CPU devices (1: the CPU's one)."""
    fake = f"--xla_force_host_platform_device_count={devices} " if devices > 1 else ""
    return fake + FAST_COMPILE
