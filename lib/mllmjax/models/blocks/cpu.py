"""CPU layouts: output-major weights, weight-first products, a linear layer with a custom weight-gradient
order, and per-layer trees for unrolled layer loops.

XLA:CPU's kernels repack the right-hand operand of x [B, D] @ W at every call, and its transpose rule
for a product's weight gradient writes the wide cotangent transposed; the forms here avoid both. Each
gives the same values and gradients as the plain product; only the order of the work differs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from mllmjax.models.blocks.adapters import Adapted, adapter_input, low_rank
from mllmjax.models.params import Params, ParamSpec


@jax.tree_util.register_pytree_node_class
class OutMajor:
    """A linear layer's weight stored output-major: `t` is [F, D], the transpose of the param tree's
    [D, *out_shape] weight flattened to [D, F]. `out_major_layer` makes them once, outside a decode
    loop; `dense` then computes the product weight-first."""

    def __init__(self, t: jax.Array, out_shape: tuple[int, ...]):
        self.t = t
        self.out_shape = out_shape

    def tree_flatten(self) -> tuple[tuple[jax.Array], tuple[int, ...]]:
        return (self.t,), self.out_shape

    @classmethod
    def tree_unflatten(cls, out_shape: tuple[int, ...], children: tuple[jax.Array]) -> OutMajor:
        return cls(children[0], out_shape)


def input_dims(spec: ParamSpec) -> int | None:
    """How many leading dims of a per-layer weight are its input, or None if it is not a matrix that
    reads or writes the residual stream: [D, *out] (q, gate) has 1, [*in, D] (o, down) has all but one."""
    axes = spec.axes
    if len(axes) < 2 or "embed" not in axes:
        return None
    return 1 if axes[0] == "embed" else len(axes) - 1


def out_major_layer(lp: Params, specs: dict[str, ParamSpec], merge_adapters: bool = True) -> Params:
    """One layer's params with its matrices as `OutMajor` (specs: that layer's, without the layer axis),
    for a decode loop on the CPU: a transposed copy, alive as long as the caller keeps it.

    An `Adapted` (LoRA) weight is merged into that copy (merge_adapters, the default: the copy is made
    anyway, and the decode step then runs one product per matrix), or kept as the transposed base weight
    plus its adapters in matrix form (the low-rank path; `scripts/bench_lora.py` compares the two)."""
    out = dict(lp)
    for name, spec in specs.items():
        n_in = input_dims(spec)
        if n_in is None or name not in lp:  # a weight other layers have (`transformer.layer_specs`)
            continue
        w = lp[name]
        if isinstance(w, Adapted) and not merge_adapters and not w.lead:
            m = w.matrix()
            out[name] = Adapted(OutMajor(m.w.T, tuple(w.shape[n_in:])), m.a, m.b, None, scale=w.scale, n_in=1)
            continue
        if isinstance(w, Adapted):
            w = w.merged()
        d_in = math.prod(w.shape[:n_in])
        out[name] = OutMajor(w.reshape(d_in, -1).T, tuple(w.shape[n_in:]))
    return out


def weight_first(w: jax.Array, x: jax.Array, out_dtype: Any = None) -> jax.Array:
    """x [..., D] times w [F, D] (output-major), computed as w x x^T and transposed back to [..., F].

    The optimization barrier keeps XLA from folding the transpose back into the product, which would
    turn it into the slow form again."""
    x2 = x.reshape(-1, x.shape[-1])
    y = jax.lax.dot_general(w, x2, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)  # [F, N]
    return jax.lax.optimization_barrier(y).T.reshape(*x.shape[:-1], w.shape[0])


def dense(x: jax.Array, w: jax.Array | OutMajor | Adapted) -> jax.Array:
    """x [..., D] @ w [D, F]: a linear layer whose weight gradient keeps the big operands untransposed.

    The value and both gradients are the plain matrix products; only the order of the weight-gradient
    product differs from autodiff's, which has XLA:CPU write the wide [N, F] cotangent transposed. The
    product itself stays an ordinary dot outside the custom rule, so remat policies such as
    dots_saveable still see, and save, it. An `OutMajor` w is multiplied weight-first. An `Adapted`
    (LoRA) w in matrix form adds its low-rank path: x w + scale (x a) b (`adapted_dense`).
    """
    if isinstance(w, Adapted):
        if isinstance(w.w, OutMajor):  # a CPU decode loop's low-rank path: no gradient taken
            return dense(x, w.w) + low_rank(x, w, dense)
        return adapted_dense(x, adapter_input(x, w), jax.lax.stop_gradient(w.w), w.a, w.b, w.scale)
    if isinstance(w, OutMajor):
        return weight_first(w.t, x)
    y = jnp.einsum("...D,DF->...F", x, w)
    return _dense_grads(x, w, jax.lax.stop_gradient(y))


@jax.custom_vjp
def _dense_grads(x: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
    """y (= x @ w), with the gradients of x @ w taken in `dense`'s order."""
    return y


def _dense_grads_fwd(
    x: jax.Array, w: jax.Array, y: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return y, (x, w)


def _dense_grads_bwd(
    res: tuple[jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, w = res
    dx = jnp.einsum("...F,DF->...D", g, w)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if w.shape[0] <= w.shape[1]:  # the operand with the smaller feature dim goes first
        dw = jnp.einsum("ND,NF->DF", x2, g2)
    else:
        dw = jnp.einsum("NF,ND->FD", g2, x2).T
    return dx, dw, None  # y is stop_gradient'ed: no cotangent for it


_dense_grads.defvjp(_dense_grads_fwd, _dense_grads_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def adapted_dense(
    x: jax.Array, xd: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float
) -> jax.Array:
    """x w + scale (xd a) b, as one product [x, xd a] [w; scale b]: a frozen w [D, F] with LoRA
    adapters a [D, r], b [r, F]; xd is x with the adapter's dropout (x itself without).

    One product, so the output is one buffer: written as the sum of two products, XLA:CPU fuses the add
    into every consumer, and a consumer that saves its input for the backward (the MLP's gate and up)
    then keeps both [tokens, F] addends alive until then, 25 MB a layer at SmolLM2's MLP and 8 x 256
    tokens (`scripts/bench_lora.py`). The concatenated weight is a transient copy of one matrix. The
    backward gives x, xd, a and b their gradients and w none: w is frozen, and its [D, F] gradient
    product is never formed."""
    return _adapted_product(x, xd, w, a, b, scale)[0]


def _adapted_product(
    x: jax.Array, xd: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
    h = jnp.einsum("...D,Dr->...r", xd, a)
    wide = jnp.concatenate([x, h.astype(x.dtype)], axis=-1)
    stacked = jnp.concatenate([w, (scale * b).astype(w.dtype)], axis=0)
    return jnp.einsum("...K,KF->...F", wide, stacked), h


def _adapted_dense_fwd(
    x: jax.Array, xd: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: float
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    y, h = _adapted_product(x, xd, w, a, b, scale)
    return y, (xd, h, w, a, b)


def _adapted_dense_bwd(
    scale: float, res: tuple[jax.Array, ...], g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    xd, h, w, a, b = res
    dh = scale * jnp.einsum("...F,rF->...r", g, b)
    dx = jnp.einsum("...F,DF->...D", g, w)
    dxd = jnp.einsum("...r,Dr->...D", dh, a)
    n = math.prod(g.shape[:-1])
    x2, h2 = xd.reshape(n, -1), h.reshape(n, -1)
    g2, dh2 = g.reshape(n, -1), dh.reshape(n, -1)
    da = jnp.einsum("Nr,ND->rD", dh2, x2).T  # the narrow operand first, as in `dense`
    db = scale * jnp.einsum("Nr,NF->rF", h2, g2)
    return dx, dxd.astype(xd.dtype), jnp.zeros_like(w), da.astype(a.dtype), db.astype(b.dtype)


adapted_dense.defvjp(_adapted_dense_fwd, _adapted_dense_bwd)


def split_layers(layers: Params, num_layers: int) -> tuple[Params, ...]:
    """The stacked layer tree as a tuple of per-layer trees, for an unrolled forward.

    Training splits before differentiating, so each layer's gradient comes out as its own tree
    (`stack_layers` joins them): slicing inside the differentiated function would instead give every
    layer's gradient as a pad to the whole stacked shape."""
    return tuple(jax.tree.map(lambda p, i=i: p[i], layers) for i in range(num_layers))


def stack_layers(layers: tuple[Params, ...] | list[Params]) -> Params:
    """The inverse of `split_layers`: per-layer trees stacked on a leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
