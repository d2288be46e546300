"""Low-rank adapters (LoRA) on a frozen weight, as the blocks see them.

An `Adapted` weight stands where a plain weight [*in, *out] would in a layer's parameter tree: the frozen
weight w, the adapters a [*in, r] and b [r, *out], the scale alpha / r, and optionally a dropout key.
The linear layers (`blocks.cpu.dense`, `blocks.linear.project`/`project_out`) compute
x w + scale (dropout(x) a) b as one product (`blocks.cpu.adapted_dense`), so no merged copy of w is kept
and, in training, the gradient of w is never formed. The experts of a
mixture of experts and the CPU decode loop's output-major copy take `merged()` instead: w + scale a b,
formed where a copy is made anyway (the transposed decode weights) or per layer (experts).

Leading batch-like dims (a mixture of experts' expert axis) are `lead` dims: a is [*lead, *in, r] and
b [*lead, r, *out]. The stacked layer axis is one more leading dim of every array, sliced off by the
layer scan like any parameter's.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class Adapted:
    """w plus scale x a @ b. n_in: how many dims (after `lead`) of w are its input; key: a raw PRNG key
    [2] uint32 for dropout on the adapter's input (None: no dropout); rate: the dropout rate."""

    def __init__(
        self,
        w: Any,
        a: Any,
        b: Any,
        key: Any = None,
        *,
        scale: float,
        n_in: int,
        lead: int = 0,
        rate: float = 0.0,
    ):
        self.w, self.a, self.b, self.key = w, a, b, key
        self.scale, self.n_in, self.lead, self.rate = scale, n_in, lead, rate

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (self.w, self.a, self.b, self.key), (self.scale, self.n_in, self.lead, self.rate)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> Adapted:
        scale, n_in, lead, rate = aux
        return cls(*children, scale=scale, n_in=n_in, lead=lead, rate=rate)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    @property
    def dtype(self) -> Any:
        return self.w.dtype

    def astype(self, dtype: Any) -> Adapted:
        """The weight and adapters in `dtype` (the compute dtype); the key stays a key."""
        w = jax.tree.map(lambda x: x.astype(dtype), self.w)  # an array, or a CPU decode loop's OutMajor
        return Adapted(
            w, self.a.astype(dtype), self.b.astype(dtype), self.key,
            scale=self.scale, n_in=self.n_in, lead=self.lead, rate=self.rate,
        )  # fmt: skip

    @property
    def _leading(self) -> int:
        """How many dims lead the input dims: stacked layers (when not sliced off) and `lead`."""
        return self.a.ndim - self.n_in - 1

    def merged(self) -> jax.Array:
        """w + scale a b as one array of w's dtype (the product in float32)."""
        p = self._leading
        r = self.a.shape[-1]
        a = self.a.astype(jnp.float32).reshape(*self.w.shape[:p], -1, r)
        b = self.b.astype(jnp.float32).reshape(*self.w.shape[:p], r, -1)
        delta = jnp.einsum("...ir,...ro->...io", a, b).reshape(self.w.shape)
        return (self.w.astype(jnp.float32) + self.scale * delta).astype(self.w.dtype)

    def matrix(self) -> Adapted:
        """One layer's weight (no leading dims) with its input dims flattened into one and its output
        dims into one: w [I, O], a [I, r], b [r, O], for one matrix product."""
        if self._leading:
            raise ValueError("Adapted.matrix takes one layer's weight without leading dims")
        i = math.prod(self.w.shape[: self.n_in])
        r = self.a.shape[-1]
        return Adapted(
            self.w.reshape(i, -1), self.a.reshape(i, r), self.b.reshape(r, -1), self.key,
            scale=self.scale, n_in=1, rate=self.rate,
        )  # fmt: skip

    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape[self.n_in :])


def adapter_input(x: jax.Array, w: Adapted) -> jax.Array:
    """x with dropout for the adapter path (inverted: kept entries scaled by 1 / (1 - rate))."""
    if w.key is None or w.rate <= 0:
        return x
    key = jax.random.wrap_key_data(w.key)
    keep = jax.random.bernoulli(key, 1.0 - w.rate, x.shape)
    return jnp.where(keep, x / (1.0 - w.rate), 0).astype(x.dtype)


def low_rank(x: jax.Array, w: Adapted, product: Any) -> jax.Array:
    """scale (dropout(x) a) b for a matrix-form w (`Adapted.matrix`), with `product(x, m)` = x @ m."""
    h = product(adapter_input(x, w), w.a)
    return (w.scale * product(h, w.b)).astype(x.dtype)
