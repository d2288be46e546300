"""Linear projections of the attention layer, whatever layout their weights are in (see `cpu`)."""

from __future__ import annotations

import math

import jax

from mllmjax.models.blocks.adapters import Adapted
from mllmjax.models.blocks.cpu import OutMajor, dense

__all__ = ["dense", "project", "project_out"]


def project(x: jax.Array, w: jax.Array | OutMajor | Adapted) -> jax.Array:
    """x [B, T, D] through w [D, *out] (e.g. [D, N, H]): one `dense` on the flattened output dims."""
    if isinstance(w, Adapted):
        if isinstance(w.w, OutMajor):  # a CPU decode loop's low-rank path: already in matrix form
            return dense(x, w).reshape(*x.shape[:-1], *w.w.out_shape)
        return dense(x, w.matrix()).reshape(*x.shape[:-1], *w.shape[1:])
    if isinstance(w, OutMajor):
        return dense(x, w).reshape(*x.shape[:-1], *w.out_shape)
    y = dense(x, w.reshape(w.shape[0], -1))
    return y.reshape(*x.shape[:-1], *w.shape[1:])


def project_out(a: jax.Array, w: jax.Array | OutMajor | Adapted) -> jax.Array:
    """The attention output a [B, T, N, H] through o [N, H, D], as one [B, T, N*H] x [N*H, D] product:
    contracting two dims lets XLA:CPU transpose the whole weight at every call."""
    b, t, n, h = a.shape
    if isinstance(w, Adapted) and not isinstance(w.w, OutMajor):
        w = w.matrix()
    elif not isinstance(w, (OutMajor, Adapted)):
        w = w.reshape(math.prod(w.shape[:2]), -1)
    return dense(a.reshape(b, t, n * h), w)
