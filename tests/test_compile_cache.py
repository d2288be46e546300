"""The persistent compilation cache (mllmjax.runtime.enable_compile_cache) and the light `--help`, as a
user's processes meet them: each command runs as its own process here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import save_hf_model

from mllmjax.convert import convert
from mllmjax.runtime import COMPILE_CACHE_MAX_BYTES, compile_cache_dir

ROOT = Path(__file__).resolve().parents[1]


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {
        # As a user's shell has it: none of the test session's cache settings (conftest.py).
        k: v for k, v in os.environ.items() if k != "MLLMJAX_COMPILE_CACHE" and not k.startswith("JAX_")
    }
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "lib"), str(ROOT)]), XLA_FLAGS="", MLLMJAX_CACHE=str(cache)
    )
    return {**env, **extra}


def _mllmjax(args: list[str], env: dict[str, str]) -> str:
    cmd = [sys.executable, "-m", "mllmjax_cli.launch", *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _entries(cache: Path) -> set[str]:
    """The cached programs (JAX keeps a NAME-KEY-cache file per program, beside its access time)."""
    folder = cache / "xla"
    return {p.name for p in folder.iterdir() if p.name.endswith("-cache")} if folder.is_dir() else set()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    save_hf_model("llama-tied", folder / "hf", seed=1)
    convert(str(folder / "hf"), folder / "ck")
    return folder / "ck"


def test_second_run_compiles_nothing_and_samples_the_same(ckpt, tmp_path):
    """The first run fills the cache; the second finds every program there (a miss would write a new
    entry: every program is kept) and samples the same tokens."""
    args = ["sample", ckpt, "w1 w2 w3", "w4", "--max-new-tokens", "9", "--json", "--seed", "3"]
    env = _env(tmp_path)
    first = _mllmjax(args, env)
    programs = _entries(tmp_path)
    assert any(name.startswith("jit_") for name in programs), programs
    # The sampler's programs are kept whole beside it (mllmjax.aot); a second run loads them as they are
    # (a miss would compile and write the entry anew: a new file).
    stored = {p.name: p.stat().st_ino for p in (tmp_path / "programs").glob("*.exe")}
    assert stored
    second = _mllmjax(args, env)
    assert second == first
    assert _entries(tmp_path) == programs
    assert {p.name: p.stat().st_ino for p in (tmp_path / "programs").glob("*.exe")} == stored


def test_concurrent_commands_share_one_cache(ckpt, tmp_path):
    """Two commands filling one empty cache at once (JAX locks its entries when the size is bounded):
    both succeed alike, and what they left serves a third run whole."""
    args = ["sample", ckpt, "w5 w6", "w7 w8 w9", "--max-new-tokens", "6", "--json", "--greedy"]
    cmd = [sys.executable, "-m", "mllmjax_cli.launch", *map(str, args)]
    procs = [subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert outs[0][0] == outs[1][0]
    programs = _entries(tmp_path)
    assert _mllmjax(args, _env(tmp_path)) == outs[0][0]
    assert _entries(tmp_path) == programs


@pytest.mark.parametrize("how", ["flag", "env"])
def test_turned_off_writes_no_cache(ckpt, tmp_path, how):
    args = ["sample", ckpt, "w1 w2", "--max-new-tokens", "3"]
    if how == "flag":
        _mllmjax(["--no-compile-cache", *args], _env(tmp_path))
    else:
        _mllmjax(args, _env(tmp_path, MLLMJAX_COMPILE_CACHE="0"))
    assert not (tmp_path / "xla").exists() and not (tmp_path / "programs").exists()


def test_cache_location_and_switch():
    assert compile_cache_dir({"MLLMJAX_CACHE": "/x/y"}) == Path("/x/y/xla")
    assert compile_cache_dir({}) == Path.home() / ".cache" / "mllmjax" / "xla"
    for off in ("0", "off", "false", "No"):
        assert compile_cache_dir({"MLLMJAX_COMPILE_CACHE": off}) is None
    assert compile_cache_dir({"MLLMJAX_COMPILE_CACHE": "1", "MLLMJAX_CACHE": "/c"}) == Path("/c/xla")


def test_enabling_before_jax_is_imported_configures_jax(tmp_path):
    """Set before jax loads (as the CLI does, so that `score` never loads it), JAX picks the settings up
    from the environment: the directory, every program kept, the size bound."""
    code = (
        "import sys; from mllmjax.runtime import enable_compile_cache; path = enable_compile_cache(); "
        "assert 'jax' not in sys.modules; import jax; c = jax.config; "
        "print(path, c.jax_compilation_cache_dir, c.jax_persistent_cache_min_compile_time_secs, "
        "c.jax_compilation_cache_max_size)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    path = str(tmp_path / "xla")
    assert done.stdout.split() == [path, path, "0.0", str(COMPILE_CACHE_MAX_BYTES)]


def test_help_loads_no_jax_torch_or_transformers(tmp_path):
    code = (
        "import sys; sys.argv = ['mllmjax', '--help']; from mllmjax_cli.launch import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('jax', 'torch', 'transformers', 'orbax', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "sample" in done.stdout and "--no-compile-cache" in done.stdout
