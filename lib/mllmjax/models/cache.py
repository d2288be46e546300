"""The KV cache for incremental decoding: a pytree, its creation, growth and writes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from mllmjax.models.config import ModelConfig

LayerKV = tuple[jax.Array, jax.Array]  # one layer's (keys, values)


@struct.dataclass
class KVCache:
    """Per-layer keys and values, in the compute dtype.

    k, v: [L, B, S, K, H], or (per-layer layout) tuples of L arrays, keys [B, K, H, S] and values
    [B, K, S, H]: heads first, so attention reads each head's cache contiguously, and keys
    transposed, so the one-token score product is a plain [G, H] x [H, S] matrix product, the layout
    XLA:CPU runs fastest. The per-layer layout is for decode loops on CPU, where the forward unrolls
    the layers and each layer's cache is its own buffer that XLA updates in place.
    pos: [B, S] position held by each slot (-1 = empty).
    index: [B] next slot each row writes to, so rows of different prompt lengths decode in step.
    """

    k: Any
    v: Any
    pos: jax.Array
    index: jax.Array

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def length(self) -> int:
        return self.pos.shape[1]


def init_cache(
    cfg: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32, *, per_layer: bool = False
) -> KVCache:
    """An empty cache; per_layer=True gives the per-layer layout (see KVCache)."""
    if per_layer:
        k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, length)
        v_shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        k = tuple(jnp.zeros(k_shape, dtype) for _ in range(cfg.num_layers))
        v = tuple(jnp.zeros(v_shape, dtype) for _ in range(cfg.num_layers))
    else:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return KVCache(
        k=k,
        v=v,
        pos=jnp.full((batch, length), -1, jnp.int32),
        index=jnp.zeros((batch,), jnp.int32),
    )


def grow_cache(cache: KVCache, length: int) -> KVCache:
    """The same cache with `length` slots (at least its own): empty slots appended after the others."""
    extra = length - cache.length
    if extra < 0:
        raise ValueError(f"cannot shrink a {cache.length}-slot cache to {length} slots")
    if extra == 0:
        return cache

    def pad(x: jax.Array, axis: int) -> jax.Array:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)

    if cache.per_layer:  # keys [B, K, H, S], values [B, K, S, H]
        k, v = tuple(pad(x, 3) for x in cache.k), tuple(pad(x, 2) for x in cache.v)
    else:  # [L, B, S, K, H]
        k, v = pad(cache.k, 2), pad(cache.v, 2)
    pos = jnp.pad(cache.pos, ((0, 0), (0, extra)), constant_values=-1)
    return cache.replace(k=k, v=v, pos=pos)


def write_rows(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int = 0) -> jax.Array:
    """Write new[b] into buf[b] at slots index[b]:index[b]+T along `axis` (of one row), for every row b."""
    return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=axis))(buf, new, index)


def write_layer(kv: LayerKV, k: jax.Array, v: jax.Array, index: jax.Array, per_layer: bool) -> LayerKV:
    """One layer's cache with the new keys and values k, v [B, T, K, H] written at each row's index."""
    ck, cv = kv
    k, v = k.astype(ck.dtype), v.astype(cv.dtype)
    if per_layer:  # keys [B, K, H, S], values [B, K, S, H]
        return write_rows(ck, k.transpose(0, 2, 3, 1), index, 2), write_rows(
            cv, v.transpose(0, 2, 1, 3), index, 1
        )
    return write_rows(ck, k, index), write_rows(cv, v, index)
