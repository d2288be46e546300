"""Compiled programs kept whole on disk, so that a later command skips tracing and lowering too.

JAX's persistent compilation cache (`runtime.enable_compile_cache`) saves XLA's compile, but it is
keyed by the lowered program, so every command still traces and lowers each program first: 4 of the
13 s of a second `mllmjax eval` of 16 prompts on SmolLM2, 2 of the 3 s to a second `mllmjax sample`'s
first token. `stored(name, jitted, static)` wraps a jitted function so that a call looks its program
up by a key of everything that decides it, and on a miss compiles it afresh (apart from the persistent
cache: see `_fresh_compile`), serializes the executable (`jax.experimental.serialize_executable`) and
writes it here.

The key: the program's name and static settings (the model config, the sampling strategy, shape
buckets, as `repr`), each argument's shape, dtype and sharding and the tree they form, the source of
every mllmjax module (a changed file changes every key), the jax and jaxlib versions, the backend and
its devices, and XLA_FLAGS. An entry is written to a temporary name and renamed (concurrent commands
never see half a file); reading touches it, and writing evicts the least recently used entries beyond
PROGRAMS_MAX_BYTES. A bad or foreign entry is recompiled and overwritten. Off where the compilation
cache is off (`--no-compile-cache`, MLLMJAX_COMPILE_CACHE=0, a JAX_COMPILATION_CACHE_DIR the user set),
in a multi-process run, and for programs that do not serialize (then the plain jitted call runs).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROGRAMS_MAX_BYTES = 2 << 30  # the store's bound: least recently used entries go beyond it
_FORMAT = 1  # the entry layout; part of every key

_lock = threading.RLock()
_directory: Path | None = None


def enable(directory: Path | None) -> None:
    """Keep compiled programs under `directory` (None: off). `runtime.enable_compile_cache` calls it."""
    global _directory
    _directory = Path(directory) if directory is not None else None


@functools.cache
def _source_digest() -> str:
    """A digest of every mllmjax module's source: a program is stale once any of them changes."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _environment() -> str:
    import jax
    import jaxlib

    devices = jax.devices()
    return repr(
        (
            _FORMAT, jax.__version__, jaxlib.__version__, jax.default_backend(), devices[0].client.platform_version,
            [(d.id, d.device_kind) for d in devices], os.environ.get("XLA_FLAGS", ""),
            jax.config.jax_enable_x64, _source_digest(),
        )
    )  # fmt: skip


def _placement(leaves: list[Any]) -> tuple[Any, ...] | None:
    """Per leaf (shape, dtype, weak type, sharding), hashable; None when a leaf is not an array (a
    program is only stored for array arguments)."""
    import jax
    import numpy as np

    parts = []
    for x in leaves:
        if isinstance(x, jax.Array):
            parts.append((x.shape, x.dtype, getattr(x, "weak_type", False), x.sharding))
        elif isinstance(x, np.ndarray | np.generic):
            parts.append((x.shape, x.dtype, False, "host"))
        else:
            return None
    return tuple(parts)


def _signature(tree: Any, placement: tuple[Any, ...]) -> str:
    """The calling convention as text, for the key on disk: the tree, and per leaf shape, dtype, weak
    type and placement."""
    return "|".join([str(tree), *(f"{shape}{dtype}{weak}{where}" for shape, dtype, weak, where in placement)])


def _evict(root: Path, keep: Path) -> None:
    """Remove the least recently used entries until the store is within PROGRAMS_MAX_BYTES."""
    entries = []
    for p in root.glob("*.exe"):
        try:
            st = p.stat()
        except FileNotFoundError:  # another process evicted it
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries):
        if total <= PROGRAMS_MAX_BYTES:
            break
        if p != keep:
            p.unlink(missing_ok=True)
            total -= size


class Stored:
    """A jitted function whose compiled programs are kept on disk (see the module docstring)."""

    def __init__(self, name: str, jitted: Callable[..., Any], static: Any) -> None:
        self.name, self.jitted, self.static = name, jitted, repr(static)
        # By the arguments' tree and placement, hashed as objects: a call that found its program once
        # neither formats nor hashes its signature again (stream calls once per decode chunk).
        self.loaded: dict[tuple[Any, ...], Any] = {}

    def __call__(self, *args: Any) -> Any:
        if _directory is None or _multi_process():
            return self.jitted(*args)
        import jax

        leaves, tree = jax.tree_util.tree_flatten(args)
        placement = _placement(leaves)
        if placement is None:
            return self.jitted(*args)
        program = self.loaded.get((tree, placement))
        if program is None:
            program = self.loaded[(tree, placement)] = self._program(args, _signature(tree, placement))
        return program(*args)

    def _program(self, args: tuple[Any, ...], signature: str) -> Any:
        """The program for args: from disk, else compiled and stored; the plain jitted function where
        it does not serialize."""
        assert _directory is not None
        text = f"{self.name}\n{self.static}\n{signature}\n{_environment()}"
        key = hashlib.sha256(text.encode()).hexdigest()[:40]
        path = _directory / f"{key}.exe"
        return _load(path) or _compile_and_store(self.jitted, args, path) or self.jitted


def stored(name: str, jitted: Callable[..., Any], static: Any = ()) -> Stored:
    """`jitted` with its programs kept on disk under `name` and `static` (what it closes over)."""
    return Stored(name, jitted, static)


def _multi_process() -> bool:
    import jax

    return jax.process_count() > 1


def _load(path: Path) -> Any:
    if not path.is_file():
        return None
    import jax
    from jax.experimental.serialize_executable import deserialize_and_load

    try:
        payload, in_tree, out_tree, ids = pickle.loads(path.read_bytes())
        devices = {d.id: d for d in jax.devices()}
        program = deserialize_and_load(
            payload, in_tree, out_tree, execution_devices=[devices[i] for i in ids]
        )
        os.utime(path)  # recently used
        return program
    except Exception as e:  # a damaged entry, or one another jaxlib wrote: compile again
        print(f"mllmjax: recompiling a stored program ({type(e).__name__}: {e})", file=sys.stderr)
        return None


_hits = threading.local()


def _on_event(event: str, **kwargs: Any) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _hits.count = getattr(_hits, "count", 0) + 1


@functools.cache
def _listen() -> None:
    import jax

    jax.monitoring.register_event_listener(_on_event)


def _fresh_compile(jitted: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, bool]:
    """(the compiled program, whether XLA compiled it here). An executable that JAX's persistent cache
    loaded does not serialize whole on XLA:CPU (its stored copy fails with "Function ... not found"),
    so JAX's cache is bypassed for this compile; if that cannot be done, a cache hit is reported."""
    from jax._src import compilation_cache

    _listen()
    before = getattr(_hits, "count", 0)
    lowered = jitted.lower(*args)
    used = getattr(compilation_cache, "is_cache_used", None)
    with _lock:
        if used is not None:
            compilation_cache.is_cache_used = lambda backend: False
        try:
            program = lowered.compile()
        finally:
            if used is not None:
                compilation_cache.is_cache_used = used
    return program, getattr(_hits, "count", 0) == before


def _compile_and_store(jitted: Callable[..., Any], args: tuple[Any, ...], path: Path) -> Any:
    from jax.experimental.serialize_executable import serialize

    program, fresh = _fresh_compile(jitted, args)
    if not fresh:
        return program  # runs, but is not stored (see _fresh_compile)
    try:
        payload, in_tree, out_tree = serialize(program)
        # The devices it runs on, in order (a loaded program is bound to these, not to all devices).
        ids = [d.id for d in program._executable._unloaded_executable.device_list]
        blob = pickle.dumps((payload, in_tree, out_tree, ids))
    except (ValueError, NotImplementedError, TypeError, AttributeError, pickle.PicklingError):
        return None  # not serializable (constants closed over, ...): run as jitted
    with _lock:  # threads of one process: one writer at a time (processes: the rename)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            _evict(path.parent, path)
        except OSError as e:  # a full or read-only disk costs the next command a compile, nothing more
            print(f"mllmjax: could not store a compiled program ({e})", file=sys.stderr)
    return program
