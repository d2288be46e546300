"""What a family's block receives besides its parameters: the rope tables and the attention call."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mllmjax.models.blocks.attention import Window, attention_shared_prompt
from mllmjax.models.blocks.kernels import Kernel, attend
from mllmjax.models.cache import LayerKV, RingWrite, gather_ring, ring_keys, write_layer

UNBOUNDED = 2**30  # the window of a global layer, when windows are traced


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """Built once per forward by `mllmjax.models.transformer` and shared by every layer.

    rope: the family's rope tables (`family.rope`), any pytree its block reads.
    q_pos [B, T], k_pos [B, S]: positions of the queries and of the keys attended to (the cache's
    slots, or the queries' own tokens); -1 marks padding and empty slots.
    index [B]: the cache slot each row writes its new tokens at (None without a cache).
    valid [B, T]: which of the new tokens are real (False for padding).
    layer: the index of the layer being run: a Python int when the layers are unrolled, a traced
    int32 scalar inside the scan over stacked layers (`select` picks by it either way).
    ring, windows: with a cache that has ring-buffer layers (`mllmjax.models.cache`), how this
    forward's tokens enter the rings, and per layer its window W (a ring layer) or None. A cache with
    rings is per-layer, so the layers are unrolled and `layer` is a Python int.
    shared: (P, S) when each row is a shared-prompt group (`mllmjax.models.transformer.fold_groups`):
    its first P tokens are a prompt that S completions of C tokens each, laid out after it one after
    another, all continue. The prompt attends to itself; each completion attends to the prompt and to
    its own earlier tokens, never to another completion: what S separate rows of prompt + completion
    compute, with the prompt's tokens computed once (and, in a backward pass, their gradient the sum
    of the S rows').
    reach [B, T]: how far ahead each new token sees (`mllmjax.models.blocks.attention`), or None
    (causal): Gemma 3's image tokens see their whole image. Only prompt tokens reach ahead.
    """

    rope: Any
    q_pos: jax.Array
    k_pos: jax.Array
    index: jax.Array | None
    per_layer: bool
    kernel: Kernel
    valid: jax.Array | None = None
    layer: int | jax.Array = 0
    ring: RingWrite | None = None
    windows: tuple[int | None, ...] = ()
    shared: tuple[int, int] | None = None
    reach: jax.Array | None = None

    def at(self, layer: int | jax.Array) -> LayerContext:
        return dataclasses.replace(self, layer=layer)

    def select(self, flags: Sequence[bool], if_true: Any, if_false: Any) -> Any:
        """if_true where flags[layer] holds, else if_false (pytrees of one structure): a Python choice
        for an unrolled layer, a `jnp.where` inside the scan."""
        if isinstance(self.layer, int):
            return if_true if flags[self.layer] else if_false
        flag = jnp.asarray(flags, bool)[self.layer]
        return jax.tree.map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)

    def window(self, flags: Sequence[bool], size: int | None) -> Window:
        """The attention window of this layer: `size` where flags[layer] holds (a sliding-window
        layer), else None; a traced scalar inside the scan when only some layers slide."""
        if size is None or not any(flags):
            return None
        if all(flags):
            return size
        if isinstance(self.layer, int):
            return size if flags[self.layer] else None
        return self.select(flags, jnp.int32(size), jnp.int32(UNBOUNDED))

    def attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        kv: LayerKV | None,
        *,
        scale: float | None = None,
        softcap: float | None = None,
        window: Window = None,
    ) -> tuple[jax.Array, LayerKV | None]:
        """Attention of q [B, T, N, H] over the new k, v [B, T, K, H] and what the layer's cache `kv`
        holds (written first); returns (output [B, T, N, H], the layer's updated cache).
        scale, softcap, window: see `mllmjax.models.blocks.attention`."""
        options = dict(scale=scale, softcap=softcap, window=window)
        if kv is None and self.shared is not None:
            return self._attend_shared(q, k, v, options), None
        if kv is None:
            return attend(q, k, v, self.q_pos, self.k_pos, self.kernel, reach=self.reach, **options), None
        if self.windows and self.windows[self.layer] is not None:
            return self._attend_ring(q, k, v, kv, options)
        assert self.index is not None
        kv = write_layer(kv, k, v, self.index, self.per_layer)
        keys, values = kv[0].astype(q.dtype), kv[1].astype(q.dtype)
        out = attend(
            q,
            keys,
            values,
            self.q_pos,
            self.k_pos,
            self.kernel,
            cache_layout=self.per_layer,
            reach=self.reach,
            **options,
        )
        return out, kv

    def _attend_shared(self, q: jax.Array, k: jax.Array, v: jax.Array, options: dict[str, Any]) -> jax.Array:
        """`attend` over shared-prompt groups (`shared`): the prompt over itself with the forward's kernel,
        the completions over the prompt and themselves (`attention_shared_prompt`, XLA)."""
        assert self.shared is not None
        p, s = self.shared
        reach = None if self.reach is None else self.reach[:, :p]
        prompt = attend(
            q[:, :p], k[:, :p], v[:, :p], self.q_pos[:, :p], self.k_pos[:, :p], self.kernel, reach=reach, **options
        )
        rows = attention_shared_prompt(q, k, v, self.q_pos, self.k_pos, p, s, **options)
        return jnp.concatenate([prompt, rows], axis=1)

    def _attend_ring(
        self, q: jax.Array, k: jax.Array, v: jax.Array, kv: LayerKV, options: dict[str, Any]
    ) -> tuple[jax.Array, LayerKV]:
        """`attend` in a layer whose cache is a ring of its window (`mllmjax.models.cache`): one token
        is written first and attends over the R ring slots; a longer chunk attends over the ring's
        old contents plus its own tokens, then the ring keeps the latest R of them."""
        size, window = self.windows[self.layer], options["window"]
        if not isinstance(window, int) or window > size:
            raise ValueError(
                f"layer {self.layer} keeps a ring of its {size}-token window; it must attend with "
                f"window <= {size}, got {window!r}"
            )
        assert self.ring is not None
        if q.shape[1] == 1:
            assert self.ring.slot is not None
            kv = write_layer(kv, k, v, self.ring.slot, per_layer=True)
            keys = kv
        else:
            assert self.ring.src is not None
            keys = ring_keys(kv, k, v)
            kv = gather_ring(keys, self.ring.src)
        out = attend(
            q,
            keys[0].astype(q.dtype),
            keys[1].astype(q.dtype),
            self.q_pos,
            self.ring.key_pos,
            self.kernel,
            cache_layout=True,
            reach=self.reach,
            **options,
        )
        return out, kv
