"""What a family's block receives besides its parameters: the rope tables and the attention call."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from mllmjax.models.blocks.kernels import Kernel, attend
from mllmjax.models.cache import LayerKV, write_layer


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """Built once per forward by `mllmjax.models.transformer` and shared by every layer.

    rope: the family's rope tables (`family.rope`), any pytree its block reads.
    q_pos [B, T], k_pos [B, S]: positions of the queries and of the keys attended to (the cache's
    slots, or the queries' own tokens); -1 marks padding and empty slots.
    index [B]: the cache slot each row writes its new tokens at (None without a cache).
    """

    rope: Any
    q_pos: jax.Array
    k_pos: jax.Array
    index: jax.Array | None
    per_layer: bool
    kernel: Kernel

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, kv: LayerKV | None
    ) -> tuple[jax.Array, LayerKV | None]:
        """Attention of q [B, T, N, H] over the new k, v [B, T, K, H] and what the layer's cache `kv`
        holds (written first); returns (output [B, T, N, H], the layer's updated cache)."""
        if kv is None:
            return attend(q, k, v, self.q_pos, self.k_pos, self.kernel), None
        assert self.index is not None
        kv = write_layer(kv, k, v, self.index, self.per_layer)
        keys, values = kv[0].astype(q.dtype), kv[1].astype(q.dtype)
        return attend(q, keys, values, self.q_pos, self.k_pos, self.kernel, cache_layout=self.per_layer), kv
