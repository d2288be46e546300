"""Compiled programs kept whole on disk (mllmjax.aot): a later process runs them without tracing, and
every part of the key, damage to an entry, the size bound and the switch behave."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllmjax import aot, models
from mllmjax.models import transformer
from mllmjax.sampling import Sample, compile_count, generate, programs


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(aot, "_directory", tmp_path)
    yield tmp_path
    # The sampler's program wrappers now hold loaded executables, which jax.clear_caches (conftest)
    # does not reach: drop them with the wrappers.
    programs.compiled.cache_clear()
    programs.sliced_layers.cache_clear()


def _function(traces: list[int]):
    def f(x, y):
        traces.append(1)  # runs only while JAX traces f
        return x * 2.0 + y, {"sum": jnp.sum(x)}

    return f


def test_a_stored_program_runs_in_a_new_process_without_tracing(store):
    traces: list[int] = []
    x, y = np.arange(6, dtype=np.float32).reshape(2, 3), jnp.ones(3)
    out, extra = aot.stored("t.f", jax.jit(_function(traces)), ("k",))(x, y)
    assert len(traces) == 1 and len(list(store.glob("*.exe"))) == 1
    # A fresh wrapper and a fresh jit, as in a new process: the program comes from disk.
    again = aot.stored("t.f", jax.jit(_function(traces)), ("k",))
    out2, extra2 = again(x, y)
    assert len(traces) == 1
    np.testing.assert_array_equal(out2, x * 2 + 1)
    np.testing.assert_array_equal(out, out2)
    assert float(extra2["sum"]) == 15.0
    texts = []
    signature = aot._signature
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot, "_signature", lambda *a: texts.append(1) or signature(*a))
        again(x, y)  # and from memory after that, without formatting or hashing its key again
        again(np.zeros((2, 3), np.float32), jnp.zeros(3))
    assert len(traces) == 1 and texts == []
    # Every part of the key makes its own program: shapes, the static settings, the name.
    again(x[:1], y)
    aot.stored("t.f", jax.jit(_function(traces)), ("other",))(x, y)
    aot.stored("t.g", jax.jit(_function(traces)), ("k",))(x, y)
    assert len(traces) == 4 and len(list(store.glob("*.exe"))) == 4


def test_a_changed_environment_or_source_is_a_new_key(store, monkeypatch):
    traces: list[int] = []
    x, y = np.ones((2, 3), np.float32), jnp.ones(3)
    aot.stored("t.f", jax.jit(_function(traces)), ())(x, y)
    monkeypatch.setattr(aot, "_environment", lambda: "another jaxlib, or an edited module")
    aot.stored("t.f", jax.jit(_function(traces)), ())(x, y)
    assert len(traces) == 2 and len(list(store.glob("*.exe"))) == 2


def test_a_damaged_entry_is_compiled_again_and_replaced(store, capsys):
    """The second compile would find the program in JAX's persistent cache (the test session keeps one),
    whose loaded executables do not serialize whole on XLA:CPU: the store compiles afresh instead, and
    the entry it writes runs."""
    traces: list[int] = []
    x, y = np.ones((2, 3), np.float32), jnp.ones(3)
    aot.stored("t.f", jax.jit(_function(traces)), ())(x, y)
    (entry,) = store.glob("*.exe")
    entry.write_bytes(b"not a program")
    out, _ = aot.stored("t.f", jax.jit(_function(traces)), ())(x, y)
    np.testing.assert_array_equal(out, x * 2 + 1)
    assert len(traces) == 2 and "recompiling a stored program" in capsys.readouterr().err
    aot.stored("t.f", jax.jit(_function(traces)), ())(x, y)  # the rewritten entry loads
    assert len(traces) == 2


def test_the_store_keeps_the_most_recently_used_within_its_bound(store, monkeypatch):
    traces: list[int] = []
    y = jnp.ones(3)
    aot.stored("t.f", jax.jit(_function(traces)), ())(np.ones((1, 3), np.float32), y)
    (first,) = store.glob("*.exe")
    monkeypatch.setattr(aot, "PROGRAMS_MAX_BYTES", first.stat().st_size + 1)
    aot.stored("t.f", jax.jit(_function(traces)), ())(np.ones((2, 3), np.float32), y)
    (second,) = store.glob("*.exe")
    assert second != first


def test_off_stores_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(aot, "_directory", None)
    traces: list[int] = []
    fn = aot.stored("t.f", jax.jit(_function(traces)), ())
    fn(np.ones((2, 3), np.float32), jnp.ones(3))
    fn(np.ones((2, 3), np.float32), jnp.ones(3))
    assert len(traces) == 1 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("spec", [None, "data=2,fsdp=2,tensor=2"])
def test_the_sampler_runs_its_stored_programs_without_tracing(store, spec):
    """The sampler's programs (whole run, prefill + donated decode, the sliced layers) from disk, on one
    device and sharded over a mesh of the 8 fake devices: the same completions, no trace."""
    from mllmjax.sampling import stream
    from mllmjax.sharding import make_mesh, shard_params

    cfg = models.tiny()
    params = transformer.init_params(cfg, jax.random.key(0))
    mesh = make_mesh(spec) if spec else None
    if mesh is not None:
        params = shard_params(params, cfg, mesh)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    strategy = Sample(temperature=1.0, top_k=20)

    def both():
        batch = generate(params, cfg, prompts, strategy, n=2, max_new_tokens=8, seed=3, mesh=mesh)
        chunks = list(stream(params, cfg, prompts[0], strategy, max_new_tokens=11, seed=3, chunk=4))
        return [c.ids for c in batch], [c.logprobs for c in batch], [t for c in chunks for t in c.ids]

    programs.compiled.cache_clear()
    programs.sliced_layers.cache_clear()
    first = both()
    assert list(store.glob("*.exe"))
    programs.compiled.cache_clear()  # as in a new process: nothing compiled in memory
    programs.sliced_layers.cache_clear()
    before = compile_count()
    second = both()
    assert compile_count() == before
    assert second[0] == first[0] and second[2] == first[2]
    np.testing.assert_array_equal(np.asarray(second[1], dtype=object), np.asarray(first[1], dtype=object))
