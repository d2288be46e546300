"""A checksum of every array of a checkpoint, so that a damaged file is found when it is loaded.

Orbax stores the parameters uncompressed and without checksums: bytes overwritten inside a file under
`params/` restore silently as wrong weights. `write_checkpoint` therefore records, in `mllmjax.json`,
two 32-bit sums of the bits of each array (`tree_checksums`), computed on the devices while the
arrays are there to be saved; `load_checkpoint` (and the optimizer-state restore of `train --resume`
and `grpo --resume`) recomputes them and refuses a mismatch naming the array.

The sums run over the array's bits as unsigned integers, weighted by position:

    s1 = sum_i bits_i * (2i + 1)           s2 = sum_i rotl(bits_i, 13) * (i * 0x9E3779B1 | 1)

modulo 2^32. Integer addition is exact and associative, so the result does not depend on how the
array is sharded or on the order of the reduction (a checkpoint written on 8 devices verifies on 1);
the weights are odd, so any change of a single element changes both sums, and swapped elements change
them too. One compiled program computes every array's sums in one pass over memory (the cost is in
`scripts/bench_verify.py`). Verification is on unless `mllmjax --no-verify` or MLLMJAX_NO_VERIFY=1.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllmjax.errors import ArtifactError

ALGORITHM = "bits-weighted-sum32x2/1"
VERIFY_ENV = "MLLMJAX_NO_VERIFY"
_verify_override: bool | None = None


def set_verify(value: bool | None) -> None:
    """Turn verification on or off for this process (None: follow MLLMJAX_NO_VERIFY)."""
    global _verify_override
    _verify_override = value


def verify_enabled() -> bool:
    if _verify_override is not None:
        return _verify_override
    return os.environ.get(VERIFY_ENV, "") in ("", "0")


def leaf_name(path: tuple[Any, ...]) -> str:
    """'layers/attn/q' for a key path of dicts, attributes and sequences."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _bits_u32(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words, in its own shape (16- and 8-bit elements widened; 64-bit
    ones split into a trailing pair of words)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise ArtifactError(f"cannot checksum arrays of dtype {x.dtype}")


def _linear_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index (mod 2^32) built from per-axis iotas: no reshape, so a sharded array
    is summed where it lies and only the two sums cross devices."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _sums(x: jax.Array) -> jax.Array:
    bits = _bits_u32(x)
    i = _linear_index(bits.shape)
    rotated = (bits << 13) | (bits >> 19)
    t1 = bits * (i * jnp.uint32(2) + jnp.uint32(1))
    t2 = rotated * ((i * jnp.uint32(0x9E3779B1)) | jnp.uint32(1))
    # One variadic reduction: both sums in one pass over memory (two jnp.sum calls read it twice and
    # ran 20x slower on XLA:CPU).
    zero = jnp.uint32(0)
    s1, s2 = jax.lax.reduce(
        (t1, t2), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(bits.ndim))
    )
    return jnp.stack([s1, s2])


@jax.jit
def _all_sums(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_sums(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def tree_checksums(tree: Any) -> dict[str, str]:
    """{array name: 16 hex digits} for every array of `tree` (jax or numpy arrays)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [leaf_name(path) for path, _ in flat]
    leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in flat]
    sums = np.asarray(jax.device_get(_all_sums(leaves))) if leaves else np.zeros((0, 2), np.uint32)
    return {name: f"{int(a):08x}{int(b):08x}" for name, (a, b) in zip(names, sums, strict=True)}


def verify_tree(tree: Any, expected: dict[str, str] | None, where: str) -> None:
    """Raise ArtifactError naming the first array of `tree` whose checksum differs from `expected`
    (no check when `expected` is None: a checkpoint written before checksums, or verification off)."""
    if expected is None or not verify_enabled():
        return
    got = tree_checksums(tree)
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ArtifactError(
            f"{where}: the checkpoint lists arrays that were not restored: {', '.join(missing[:5])}"
        )
    for name, value in got.items():
        if name in expected and expected[name] != value:
            raise ArtifactError(
                f"{where}: array {name} does not match its checksum (the file holding it is damaged); "
                f"convert or copy the checkpoint again, or pass `mllmjax --no-verify` to load it anyway"
            )
