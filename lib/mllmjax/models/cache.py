"""The KV cache for incremental decoding: a pytree, its creation, growth and writes.

A layer with a sliding window W (`ModelConfig.layer_windows`) keeps a ring buffer of R = min(W, S)
slots instead of the cache's S: no query can see further back than W positions, so decode reads W
keys per step whatever the context. The ring is a set of the R valid tokens with the largest
positions seen so far, in no particular slot order (masks come from positions): a one-token step
overwrites the slot of smallest position (an empty slot first), a longer chunk keeps the top R of
the ring's old contents and its own valid tokens, by position. Ranking by position rather than by
cache slot keeps the ring independent of where the full-length layers put padding: padding takes
full-length slots (left-padded prompts, finished rows) but never a ring slot, so the ring holds
the last R real tokens whatever the padding. While R == S < W the ring cannot lose a token that a
full-length layer still holds (those also fill up with padding), so growing it (`grow_cache`) is
padding with empty slots up to min(W, new S).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from mllmjax.errors import UnsupportedModelError
from mllmjax.models.config import ModelConfig

LayerKV = tuple[jax.Array, jax.Array]  # one layer's (keys, values)


@struct.dataclass
class KVCache:
    """Per-layer keys and values, in the compute dtype.

    k, v: [L, B, S, K, H], or (per-layer layout) tuples of L arrays, keys [B, K, H, S] and values
    [B, K, S, H]: heads first, so attention reads each head's cache contiguously, and keys
    transposed, so the one-token score product is a plain [G, H] x [H, S] matrix product, the layout
    XLA:CPU runs fastest. The per-layer layout is for decode loops on CPU, where the forward unrolls
    the layers and each layer's cache is its own buffer that XLA updates in place; a model with
    windowed layers always has it, since its layers' caches differ in length (a windowed layer's
    entry has R ring slots in place of S, in the same layout).
    pos: [B, S] position held by each slot of the full-length layers (-1 = empty).
    index: [B] next slot each row writes to, so rows of different prompt lengths decode in step.
    ring_pos: [B, R] position held by each ring slot, shared by every windowed layer (all have one
    window); None without windowed layers.
    windows: per layer, its window W (a ring layer) or None (static).
    """

    k: Any
    v: Any
    pos: jax.Array
    index: jax.Array
    ring_pos: jax.Array | None = None
    windows: tuple[int | None, ...] = struct.field(pytree_node=False, default=())

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def length(self) -> int:
        return self.pos.shape[1]

    @property
    def window(self) -> int | None:
        """The ring layers' window W (None without windowed layers)."""
        return next((w for w in self.windows if w is not None), None)


def cache_window(cfg: ModelConfig) -> int | None:
    """The one window W of cfg's windowed layers, or None if none is windowed."""
    sizes = sorted({w for w in cfg.layer_windows() if w is not None})
    if len(sizes) > 1:
        raise UnsupportedModelError(
            f"sliding windows of different sizes {sizes} in one model are not supported; "
            "supported: one window for every windowed layer"
        )
    return sizes[0] if sizes else None


def init_cache(
    cfg: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32, *, per_layer: bool = False
) -> KVCache:
    """An empty cache; per_layer=True gives the per-layer layout (see KVCache), which a model with
    windowed layers gets whatever per_layer says, with ring entries of min(W, length) slots."""
    window = cache_window(cfg)
    windows = cfg.layer_windows() if window is not None else ()
    ring_pos = None
    if window is not None:
        per_layer = True
        ring_pos = jnp.full((batch, min(window, length)), -1, jnp.int32)
    if per_layer:
        slots = [length if w is None else min(w, length) for w in windows or (None,) * cfg.num_layers]
        k = tuple(jnp.zeros((batch, cfg.num_kv_heads, cfg.head_dim, s), dtype) for s in slots)
        v = tuple(jnp.zeros((batch, cfg.num_kv_heads, s, cfg.head_dim), dtype) for s in slots)
    else:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    return KVCache(
        k=k,
        v=v,
        pos=jnp.full((batch, length), -1, jnp.int32),
        index=jnp.zeros((batch,), jnp.int32),
        ring_pos=ring_pos,
        windows=windows,
    )


def repeat_rows(cache: KVCache, n: int) -> KVCache:
    """The cache with every row repeated n times in place (row r -> rows r * n .. r * n + n - 1): a
    prefilled prompt shared by n rows (the sampler's group samples, or one shared prefix)."""
    if n == 1:
        return cache

    def rep(x: jax.Array, axis: int = 0) -> jax.Array:
        return jnp.repeat(x, n, axis=axis)

    if cache.per_layer:  # per-layer entries [B, ...]
        k, v = tuple(rep(x) for x in cache.k), tuple(rep(x) for x in cache.v)
    else:  # [L, B, S, K, H]
        k, v = rep(cache.k, 1), rep(cache.v, 1)
    ring_pos = rep(cache.ring_pos) if cache.ring_pos is not None else None
    return cache.replace(k=k, v=v, pos=rep(cache.pos), index=rep(cache.index), ring_pos=ring_pos)


def _pad_slots(x: jax.Array, axis: int, extra: int, value: int = 0) -> jax.Array:
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def grow_cache(cache: KVCache, length: int) -> KVCache:
    """The same cache with `length` slots (at least its own): empty slots appended after the others.
    Ring layers grow to min(W, length) slots (see the module docstring)."""
    extra = length - cache.length
    if extra < 0:
        raise ValueError(f"cannot shrink a {cache.length}-slot cache to {length} slots")
    if extra == 0:
        return cache
    if not cache.per_layer:  # [L, B, S, K, H]
        return cache.replace(
            k=_pad_slots(cache.k, 2, extra),
            v=_pad_slots(cache.v, 2, extra),
            pos=_pad_slots(cache.pos, 1, extra, -1),
        )
    ring_pos = cache.ring_pos
    ring_extra = 0
    if ring_pos is not None:
        ring_extra = min(cache.window, length) - ring_pos.shape[1]
        ring_pos = _pad_slots(ring_pos, 1, ring_extra, -1)
    windows = cache.windows or (None,) * len(cache.k)
    grown = [extra if w is None else ring_extra for w in windows]
    # keys [B, K, H, S], values [B, K, S, H]
    return cache.replace(
        k=tuple(_pad_slots(x, 3, n) for x, n in zip(cache.k, grown, strict=True)),
        v=tuple(_pad_slots(x, 2, n) for x, n in zip(cache.v, grown, strict=True)),
        pos=_pad_slots(cache.pos, 1, extra, -1),
        ring_pos=ring_pos,
    )


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


@dataclasses.dataclass(frozen=True)
class RingWrite:
    """How one forward's T new tokens enter the ring layers: worked out once from positions and shared
    by every ring layer (`ring_write`).

    T == 1: `slot` [B] is the ring slot each row's token overwrites (its smallest position), and the
    layer attends over the written ring, whose positions are `key_pos` [B, R].
    T > 1: the layer attends over the ring's old contents followed by the chunk's own tokens (a chunk
    longer than R needs keys the ring cannot hold at once), positions `key_pos` [B, R + T]; the new
    ring is that sequence gathered at `src` [B, R], the R largest positions (a gather, not a scatter,
    so it is deterministic).
    new_pos [B, R]: the ring's positions after the write.
    """

    key_pos: jax.Array
    new_pos: jax.Array
    slot: jax.Array | None = None
    src: jax.Array | None = None


def ring_write(ring_pos: jax.Array, key_pos: jax.Array) -> RingWrite:
    """The ring update for new tokens at positions key_pos [B, T] (-1 for padding) into a ring that
    holds positions ring_pos [B, R]."""
    if key_pos.shape[1] == 1:
        slot = jnp.argmin(ring_pos, axis=1).astype(jnp.int32)  # empty (-1) first, then the oldest
        new_pos = write_rows(ring_pos, key_pos, slot)
        return RingWrite(key_pos=new_pos, new_pos=new_pos, slot=slot)
    both = jnp.concatenate([ring_pos, key_pos], axis=1)
    # Ties are only between empty or padding entries (-1); top_k takes the lower index first.
    new_pos, src = jax.lax.top_k(both, ring_pos.shape[1])
    return RingWrite(key_pos=both, new_pos=new_pos, src=src.astype(jnp.int32))


def ring_keys(kv: LayerKV, k: jax.Array, v: jax.Array) -> LayerKV:
    """A ring layer's (per-layer layout) keys and values followed by the new k, v [B, T, K, H]:
    keys [B, K, H, R + T], values [B, K, R + T, H]."""
    ck, cv = kv
    k, v = k.astype(ck.dtype), v.astype(cv.dtype)
    return (
        jnp.concatenate([ck, k.transpose(0, 2, 3, 1)], axis=3),
        jnp.concatenate([cv, v.transpose(0, 2, 1, 3)], axis=2),
    )


def gather_ring(kv: LayerKV, src: jax.Array) -> LayerKV:
    """The ring slots src [B, R] of keys [B, K, H, N] and values [B, K, N, H]."""
    ck, cv = kv
    return (
        jnp.take_along_axis(ck, src[:, None, None, :], axis=3),
        jnp.take_along_axis(cv, src[:, None, :, None], axis=2),
    )
