"""The decoder shared by Llama, Qwen2 and Qwen3: pure functions over a parameter pytree.

Design decisions:
- Parameters are a nested dict of arrays with the layers stacked on a leading axis, so the forward
  pass is one `lax.scan` over layers: compile time does not grow with depth, and remat wraps one body.
  A caller may instead pass the layers as a sequence of per-layer trees (`split_layers`); `forward`
  then unrolls them (decode loops and training on CPU, where the scan's stacking copies cost time).
- `param_specs(cfg)` is the single declaration of every parameter's shape and logical axis names;
  initialisation, sharding and the HF name tables all read it, so they cannot drift apart.
- Attention masks are derived from positions alone: a key at position p is visible to a query at
  position q iff 0 <= p <= q. Padding and empty cache slots carry position -1. The same code serves
  the full forward, cached prefill and one-token decode, and a padded row computes exactly what the
  unpadded row would (masked keys get probability exactly 0).
- Norms, RoPE, softmax and logits are float32 whatever the compute dtype; the KV cache is kept in the
  compute dtype.
- The LM head is stored as [vocab, embed] like the embedding, so tied and untied models share one code
  path and the loss can slice the vocabulary for chunked log-softmax.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mllmjax.errors import BadInputError
from mllmjax.models.config import ModelConfig

Params = dict[str, Any]
ParamSpec = tuple[tuple[int, ...], tuple[str | None, ...]]

_MASKED = -1e30  # finite, so a row with no visible key gives a uniform (not NaN) softmax


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """Shape and logical axis names of every parameter, as a tree shaped like the params."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    n, k, L, v = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, cfg.vocab_size
    layers: dict[str, ParamSpec] = {
        "attn_norm": ((L, d), ("layers", "norm")),
        "q": ((L, d, n, h), ("layers", "embed", "heads", "head_dim")),
        "k": ((L, d, k, h), ("layers", "embed", "kv_heads", "head_dim")),
        "v": ((L, d, k, h), ("layers", "embed", "kv_heads", "head_dim")),
        "o": ((L, n, h, d), ("layers", "heads", "head_dim", "embed")),
        "mlp_norm": ((L, d), ("layers", "norm")),
        "gate": ((L, d, f), ("layers", "embed", "mlp")),
        "up": ((L, d, f), ("layers", "embed", "mlp")),
        "down": ((L, f, d), ("layers", "mlp", "embed")),
    }
    if cfg.qkv_bias:
        layers["q_bias"] = ((L, n, h), ("layers", "heads", "head_dim"))
        layers["k_bias"] = ((L, k, h), ("layers", "kv_heads", "head_dim"))
        layers["v_bias"] = ((L, k, h), ("layers", "kv_heads", "head_dim"))
    if cfg.o_bias:
        layers["o_bias"] = ((L, d), ("layers", "norm"))
    if cfg.qk_norm:
        layers["q_norm"] = ((L, h), ("layers", "head_dim"))
        layers["k_norm"] = ((L, h), ("layers", "head_dim"))
    specs: dict[str, Any] = {
        "embed": ((v, d), ("vocab", "embed")),
        "final_norm": ((d,), ("norm",)),
        "layers": layers,
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ((v, d), ("vocab", "embed"))
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def map_specs(fn: Callable[[str, ParamSpec], Any], specs: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Apply fn(path, spec) to every leaf of a spec tree; paths look like 'layers/q'."""
    return {
        key: fn(f"{prefix}{key}", val) if _is_spec(val) else map_specs(fn, val, f"{prefix}{key}/")
        for key, val in specs.items()
    }


def init_params(cfg: ModelConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal(0, 0.02) weights, unit norms, zero biases), for tests and benches."""
    leaves: list[str] = []
    map_specs(lambda path, _: leaves.append(path), param_specs(cfg))
    keys = dict(zip(leaves, jax.random.split(rng, len(leaves)), strict=True))

    def make(path: str, spec: ParamSpec) -> jax.Array:
        shape, _ = spec
        name = path.rsplit("/", 1)[-1]
        if name.endswith("norm"):
            return jnp.ones(shape, dtype)
        if name.endswith("bias"):
            return jnp.zeros(shape, dtype)
        return (0.02 * jax.random.normal(keys[path], shape, jnp.float32)).astype(dtype)

    return map_specs(make, param_specs(cfg))


@struct.dataclass
class KVCache:
    """Per-layer keys and values for incremental decoding.

    k, v: [L, B, S, K, H] in the compute dtype, or (per-layer layout) tuples of L arrays, keys
    [B, K, H, S] and values [B, K, S, H]: heads first, so attention reads each head's cache
    contiguously instead of transposing the whole cache at every step, and keys transposed, so the
    one-token score product is a plain [G, H] x [H, S] matrix product (XLA:CPU runs the [H, S]
    layout about 7x faster than contracting the minor dim of [S, H] for a handful of query rows).
    pos: [B, S] position held by each slot (-1 = empty).
    index: [B] next slot each row writes to, so rows of different prompt lengths decode in step.

    The per-layer layout is for decode loops on CPU: `forward` then unrolls the layers, so each
    layer's cache is its own buffer that XLA updates in place inside a while loop. A decode loop
    also passes params["layers"] as a tuple of per-layer trees sliced once outside the loop: the
    layer scan dynamic-slices, i.e. copies, every layer's weights and cache at every step on CPU.
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


def split_layers(layers: Params, num_layers: int) -> tuple[Params, ...]:
    """The stacked layer tree as a tuple of per-layer trees, for an unrolled `forward`.

    Training splits before differentiating, so each layer's gradient comes out as its own tree
    (`stack_layers` joins them): slicing inside the differentiated function would instead give every
    layer's gradient as a pad to the whole stacked shape."""
    return tuple(jax.tree.map(lambda p, i=i: p[i], layers) for i in range(num_layers))


def stack_layers(layers: tuple[Params, ...] | list[Params]) -> Params:
    """The inverse of `split_layers`: per-layer trees stacked on a leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, H/2] of positions [B, T], shared by every layer. Computed inside a
    forward, XLA:CPU still fuses the trig into each layer's RoPE and evaluates it per head; a decode
    loop therefore passes them in (`forward`'s rope), computed at the end of the previous step."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    return jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the HF convention). x: [B, T, N, H]; cos, sin from `rope_tables`."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _visible(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """[B, T, S]: key s is visible to query t iff 0 <= k_pos <= q_pos (the position-derived mask)."""
    return (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    cache_layout: bool = False,
) -> jax.Array:
    """Grouped-query attention with a position-derived causal mask.

    q: [B, T, N, H]; k, v: [B, S, K, H], or with cache_layout the per-layer cache's k [B, K, H, S] and
    v [B, K, S, H]; q_pos: [B, T]; k_pos: [B, S] (-1 = not a key).
    """
    b, t, n, h = q.shape
    if cache_layout:
        k_minor = "BKHS"
    else:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
        k_minor = "BKSH"
    kv = k.shape[1]
    g = n // kv
    # Head n reads kv head n // G (HF's repeat_kv). The G query heads of a kv head and the T queries
    # are one [G*T, H] block, so each (row, kv head) is a single plain [G*T, H] x [H, S] product with
    # the contracted dims minor in both operands: XLA:CPU runs this layout 2-4x faster than the same
    # einsum over [B, T, K, G, H] (it would otherwise transpose inside the batched dot, or fall back
    # to tiny per-head products when decoding one token). Decoding, the cache holds keys as [H, S].
    qh = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
    scores = jnp.einsum(f"BKMH,{k_minor}->BKMS", qh, k, preferred_element_type=jnp.float32) * (h**-0.5)
    scores = scores.reshape(b, kv, g, t, -1)
    scores = jnp.where(_visible(q_pos, k_pos)[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
    out = jnp.einsum("BKMS,BKSH->BKMH", probs, v)  # [B, K, G*T, H]
    return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


CAUSAL_BLOCK = 64  # the smallest query block of `attention_causal`
CAUSAL_MAX_BLOCKS = 8


def causal_blocks(t: int) -> int:
    """How many query blocks `attention_causal` splits a sequence of t tokens into (1: no split)."""
    block = max(CAUSAL_BLOCK, -(-t // CAUSAL_MAX_BLOCKS))
    return t // block if t % block == 0 else 1


def attention_causal(
    q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array
) -> jax.Array:
    """`attention` of a sequence over itself (k, v: [B, T, K, H], the queries' own tokens), skipping the
    key blocks after each query block.

    Query block i attends to keys 0 .. end of block i only, under the same position mask: exact as long
    as no valid key after a query in its row is visible to it, i.e. positions increase along each
    row's valid tokens, as every batch here is laid out (left-padded prompts, then completions). With
    n blocks (`causal_blocks`) the products and the saved probabilities shrink to (n + 1) / 2n of the
    full square: at 8 x 256 tokens (4 blocks) one layer's attention, forward and backward, went from
    49 to 35 ms on 2 cores.
    """
    t = q.shape[1]
    n = causal_blocks(t)
    block = t // n
    outs = []
    for i in range(n):
        rows, keys = slice(i * block, (i + 1) * block), slice(0, (i + 1) * block)
        outs.append(attention(q[:, rows], k[:, keys], v[:, keys], q_pos[:, rows], k_pos[:, keys]))
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")


def resolve_attention(name: str, compute_dtype: Any, backend: str | None = None) -> str:
    """The attention implementation a full-sequence forward (training, log-probs) uses.

    "xla": `attention` above (`attention_causal` for a forward without a cache), everywhere. "cudnn":
    cuDNN's fused flash attention through `jax.nn.dot_product_attention` (GPU only, bfloat16/float16
    only: that is what the kernel takes).
    "pallas": JAX's Pallas flash-attention kernel for TPU (`attention_pallas`, run per device under
    shard_map when the forward is given its mesh). "auto" picks cudnn on a GPU with a half-precision
    compute dtype, pallas on a TPU, and xla otherwise: the choice follows the backend and the dtype,
    never array shapes. Decoding with a KV cache always uses xla.
    """
    if name not in ATTENTION_IMPLS:
        raise BadInputError(f"unknown attention {name!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
    backend = backend or jax.default_backend()
    half = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "cudnn":
        if backend != "gpu":
            raise BadInputError(f"--attention cudnn needs a GPU; this run is on {backend}")
        if not half:
            raise BadInputError("--attention cudnn needs --compute-dtype bfloat16 or float16")
        return "cudnn"
    if name == "pallas":
        if backend != "tpu":
            raise BadInputError(f"--attention pallas needs a TPU; this run is on {backend}")
        return "pallas"
    if name == "auto":
        if backend == "tpu":
            return "pallas"
        return "cudnn" if backend == "gpu" and half else "xla"
    return "xla"


def attention_fused(
    q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *, implementation: str
) -> jax.Array:
    """`attention` through jax.nn.dot_product_attention (implementation "cudnn" or, for tests, "xla").

    Same arguments and mask as `attention` (k, v: [B, S, K, H]). A query that sees no key (padding)
    is given its own slot, so no row of the fused softmax is empty; such rows are padding and never
    read. The mask is passed whole, so left and right padding both work.
    """
    t, s = q.shape[1], k.shape[1]
    visible = _visible(q_pos, k_pos)
    if t == s:
        visible = visible | jnp.eye(t, dtype=bool)[None]
    return jax.nn.dot_product_attention(q, k, v, mask=visible[:, None], implementation=implementation)


PALLAS_BLOCK = 128  # the TPU kernel's default block along the sequence


def attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
    """`attention` through JAX's Pallas TPU flash-attention kernel (on other backends, run and compile
    under `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`, as the tests do).

    With a mesh of several devices the kernel runs per device under `jax.shard_map`: rows split over
    the batch axes (data, fsdp) and heads over tensor, where they divide evenly (else that dim is
    whole on every device). Without it a custom kernel is one opaque call, and XLA would gather its
    sharded inputs onto every device.

    For the full-sequence forward only (the keys are the queries' own tokens, k, v: [B, T, K, H]) with
    positions increasing along each row's valid tokens, as the trainer lays batches out (left-padded
    prompts, then completions): the kernel's causal-by-index mask plus a segment id that separates
    valid tokens from padding then equals the position mask. Padding queries attend to padding (never
    read). The sequence is padded to the kernel's blocks and kv heads are repeated to the query heads.
    """
    if mesh is not None and mesh.size > 1:
        from jax.sharding import PartitionSpec as P

        from mllmjax.sharding import batch_axes  # (sharding imports this module)

        n, kv = q.shape[2], k.shape[2]
        row_spec = batch_axes(mesh, q.shape[0])
        tensor = mesh.shape.get("tensor", 1)
        head_spec = "tensor" if tensor > 1 and n % tensor == 0 and kv % tensor == 0 else None
        heads, pos = P(row_spec, None, head_spec, None), P(row_spec, None)
        return jax.shard_map(
            attention_pallas, mesh=mesh, in_specs=(heads, heads, heads, pos, pos), out_specs=heads,
            check_vma=False,
        )(q, k, v, q_pos, k_pos)  # fmt: skip
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, t, n, h = q.shape
    groups = n // k.shape[2]
    pad = (-t) % PALLAS_BLOCK

    def heads_first(x: jax.Array, repeat: int) -> jax.Array:
        x = jnp.repeat(x, repeat, axis=2) if repeat > 1 else x
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))

    segments = jnp.pad((k_pos >= 0).astype(jnp.int32), ((0, 0), (0, pad)))
    args = (heads_first(q, 1), heads_first(k, groups), heads_first(v, groups))
    out = fa.flash_attention(
        *args, segment_ids=fa.SegmentIds(q=segments, kv=segments), causal=True, sm_scale=h**-0.5
    )
    return out[:, :, :t].transpose(0, 2, 1, 3)


@jax.tree_util.register_pytree_node_class
class OutMajor:
    """A linear layer's weight stored output-major: `t` is [F, D], the transpose of the param tree's
    [D, *out_shape] weight flattened to [D, F]. `out_major_layer` makes them, once, outside a decode
    loop; `dense` and `_project` then compute the product weight-first (see `dense_out_major`)."""

    def __init__(self, t: jax.Array, out_shape: tuple[int, ...]):
        self.t = t
        self.out_shape = out_shape

    def tree_flatten(self) -> tuple[tuple[jax.Array], tuple[int, ...]]:
        return (self.t,), self.out_shape

    @classmethod
    def tree_unflatten(cls, out_shape: tuple[int, ...], children: tuple[jax.Array]) -> OutMajor:
        return cls(children[0], out_shape)


OUT_MAJOR_WEIGHTS = ("q", "k", "v", "o", "gate", "up", "down")


def out_major_layer(lp: Params) -> Params:
    """One layer's params (a slice of `params["layers"]`) with its projection weights as `OutMajor`:
    a decode loop on the CPU takes these (see `dense_out_major`). This is a transposed copy of the
    layer's matrices, alive as long as the caller keeps it."""
    out = dict(lp)
    for name in OUT_MAJOR_WEIGHTS:
        w = lp[name]
        d_in = math.prod(w.shape[:2]) if name == "o" else w.shape[0]
        out_shape = w.shape[2:] if name == "o" else w.shape[1:]
        out[name] = OutMajor(w.reshape(d_in, -1).T, tuple(out_shape))
    return out


def dense_out_major(x: jax.Array, w: OutMajor) -> jax.Array:
    """x [..., D] @ w as the weight-first product (w.t [F, D] x x^T), then transposed back to [..., F].

    For a decode step's few rows XLA:CPU's kernels run x [B, D] @ W [D, F] with the weight as the
    right-hand operand, which they repack at every call: at batch 64, SmolLM2-135M's layer products
    took 93-97 ms a step against 77-81 ms weight-first (b16: 38 against 29 ms; measured one layer stack
    in a loop). The weight-first form needs the weight output-major and its result transposed; the
    optimization barrier keeps XLA from folding that transpose back into the product, which it would
    otherwise turn into the slow form again."""
    return _weight_first(w.t, x)


def _weight_first(w: jax.Array, x: jax.Array, out_dtype: Any = None) -> jax.Array:
    """x [..., D] times w [F, D] (output-major), computed as w x x^T and transposed back to [..., F]."""
    x2 = x.reshape(-1, x.shape[-1])
    y = jax.lax.dot_general(w, x2, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)  # [F, N]
    return jax.lax.optimization_barrier(y).T.reshape(*x.shape[:-1], w.shape[0])


def dense(x: jax.Array, w: jax.Array | OutMajor) -> jax.Array:
    """x [..., D] @ w [D, F]: a linear layer whose weight gradient keeps the big operands untransposed.

    The value and both gradients are the plain matrix products; only the order of the weight-gradient
    product differs from autodiff's. JAX's transpose rule computes dW as (cotangent^T @ x)^T, and
    XLA:CPU then writes the [N, F] cotangent (for the MLP: the SiLU backward and the gated product,
    [tokens, 1536] each) transposed from an elementwise fusion before the product. Here the operand
    with the smaller feature dim goes first, so at most the narrower one ([tokens, 576]) is
    transposed: one SmolLM2-135M training update (8 x 256 tokens, 2 cores) went from 14.4-14.9 s to
    12.2-12.9 s, its CPU time down 16%.

    The product itself stays an ordinary dot outside the custom rule (its gradient is routed through
    `_dense_grads`), so remat policies such as dots_saveable still see, and save, it. An `OutMajor` w
    (decode loops on the CPU) goes through `dense_out_major`.
    """
    if isinstance(w, OutMajor):
        return dense_out_major(x, w)
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
    if w.shape[0] <= w.shape[1]:
        dw = jnp.einsum("ND,NF->DF", x2, g2)
    else:
        dw = jnp.einsum("NF,ND->FD", g2, x2).T
    return dx, dw, None  # y is stop_gradient'ed: no cotangent for it


_dense_grads.defvjp(_dense_grads_fwd, _dense_grads_bwd)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, whose backward keeps only gate and up and recomputes the sigmoid.

    Autodiff of the same expression saves the sigmoid and silu(gate) too: two more [tokens, F]
    arrays per layer written in the forward and read in the backward (F = 1536 for SmolLM2).
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, up = res
    x, g32 = gate.astype(jnp.float32), g.astype(jnp.float32)
    s = jax.nn.sigmoid(x)
    d_gate = g32 * up.astype(jnp.float32) * s * (1.0 + x * (1.0 - s))
    return d_gate.astype(gate.dtype), (g32 * x * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _project(x: jax.Array, w: jax.Array | OutMajor) -> jax.Array:
    """x [B, T, D] through w [D, *out] (e.g. [D, N, H]): one `dense` on the flattened output dims."""
    if isinstance(w, OutMajor):
        return dense_out_major(x, w).reshape(*x.shape[:-1], *w.out_shape)
    y = dense(x, w.reshape(w.shape[0], -1))
    return y.reshape(*x.shape[:-1], *w.shape[1:])


def _write_rows(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Write new[b] into buf[b, index[b]:index[b]+T] for every row b."""
    return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=0))(buf, new, index)


def _write_keys_per_layer(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """buf: [B, K, H, S]; new: [B, T, K, H]; write new[b] at slots index[b]:index[b]+T."""
    new = new.transpose(0, 2, 3, 1)  # [B, K, H, T]
    return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=2))(buf, new, index)


def _write_values_per_layer(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """buf: [B, K, S, H]; new: [B, T, K, H]; write new[b] at slots index[b]:index[b]+T."""
    new = new.transpose(0, 2, 1, 3)  # [B, K, T, H]
    return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=1))(buf, new, index)


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype", "remat", "attention_impl", "mesh"))
def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    valid: jax.Array | None = None,
    cache: KVCache | None = None,
    compute_dtype: Any = None,
    remat: Callable[..., Any] | None = None,
    attention_impl: str = "xla",
    mesh: jax.sharding.Mesh | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Run the decoder; return (final-normed hidden states [B, T, D], updated cache or None).

    params["layers"]: stacked (one `lax.scan` over the layers) or a sequence of per-layer trees
    (`split_layers`; the layers are then unrolled, as they are with a per-layer cache).
    tokens, positions: [B, T] int. valid: [B, T] bool, False for padding (default all True).
    With a cache, the T new tokens are written at each row's `cache.index`, and attend to everything
    already cached plus themselves; invalid tokens are stored with position -1 (never attended) and do
    not advance the row's index.
    remat: a `jax.checkpoint` policy (e.g. jax.checkpoint_policies.nothing_saveable) to recompute the
    layer body in the backward pass, or None to keep its activations.
    attention_impl: "xla", "cudnn" or "pallas" (from `resolve_attention`), or "fused-xla" (the cudnn
    entry point with XLA's kernel, to check that wiring on any backend); a forward with a cache always
    uses `attention`, one without it "xla" as `attention_causal` (so positions must increase along
    each row's valid tokens). mesh: the devices the arrays are sharded over, for kernels that run per
    device (pallas); other paths leave the partitioning to XLA.
    rope: `rope_tables(positions, cfg.inv_freq())`, if the caller has them (default: computed here).
    """
    cdt = jnp.dtype(compute_dtype) if compute_dtype is not None else params["embed"].dtype
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    positions = positions.astype(jnp.int32)
    key_pos = jnp.where(valid, positions, -1)
    cos, sin = rope_tables(positions, jnp.asarray(cfg.inv_freq())) if rope is None else rope
    eps = cfg.rms_norm_eps
    x = jnp.take(params["embed"], tokens, axis=0).astype(cdt)  # [B, T, D]

    if cache is not None:
        cache_pos = _write_rows(cache.pos, key_pos, cache.index)  # [B, S]
    else:
        cache_pos = key_pos

    def body(x: jax.Array, layer: tuple[Params, jax.Array | None, jax.Array | None]):
        lp, ck, cv = layer
        lp = jax.tree.map(lambda p: p.astype(cdt), lp)
        h = rms_norm(x, lp["attn_norm"], eps)
        q, k, v = _project(h, lp["q"]), _project(h, lp["k"]), _project(h, lp["v"])
        if cfg.qkv_bias:
            q, k, v = q + lp["q_bias"], k + lp["k_bias"], v + lp["v_bias"]
        if cfg.qk_norm:
            q, k = rms_norm(q, lp["q_norm"], eps), rms_norm(k, lp["k_norm"], eps)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        cache_layout = ck is not None and cache.per_layer
        if ck is not None:
            write_k, write_v = (
                (_write_keys_per_layer, _write_values_per_layer)
                if cache_layout
                else (_write_rows, _write_rows)
            )
            ck = write_k(ck, k.astype(ck.dtype), cache.index)
            cv = write_v(cv, v.astype(cv.dtype), cache.index)
            keys, values = ck.astype(cdt), cv.astype(cdt)
        else:
            keys, values = k, v
        if attention_impl == "pallas" and ck is None:
            a = attention_pallas(q, keys, values, positions, cache_pos, mesh)
        elif attention_impl != "xla" and ck is None:
            impl = "xla" if attention_impl == "fused-xla" else attention_impl
            a = attention_fused(q, keys, values, positions, cache_pos, implementation=impl)
        elif ck is None:
            a = attention_causal(q, keys, values, positions, cache_pos)
        else:
            a = attention(q, keys, values, positions, cache_pos, cache_layout=cache_layout)
        # One [B, T, N*H] x [N*H, D] product: contracting two dims lets XLA:CPU transpose the whole
        # o weight at every call instead of the small activation.
        nh = cfg.num_heads * cfg.head_dim
        wo = lp["o"] if isinstance(lp["o"], OutMajor) else lp["o"].reshape(nh, -1)
        o = dense(a.reshape(*a.shape[:2], nh), wo)
        if cfg.o_bias:
            o = o + lp["o_bias"]
        x = x + o
        h = rms_norm(x, lp["mlp_norm"], eps)
        x = x + dense(swiglu(dense(h, lp["gate"]), dense(h, lp["up"])), lp["down"])
        return x, (ck, cv)

    layers = params["layers"]
    split = isinstance(layers, (tuple, list))
    unrolled = (cache is not None and cache.per_layer) or (cache is None and split)
    if remat is not None:
        # Under scan, XLA cannot merge the backward's recomputation with the forward (JAX's docs on
        # jax.checkpoint); unrolled it would, and keep every activation after all.
        body = jax.checkpoint(body, policy=remat, prevent_cse=unrolled)
    if unrolled:
        # Unrolled. A caller looping over decode steps, or differentiating, passes the layers
        # pre-sliced (`split_layers`, outside its loop or its grad); stacked layers are sliced here.
        new_k, new_v = [], []
        per_layer = layers if split else split_layers(layers, cfg.num_layers)
        for i, lp in enumerate(per_layer):
            kv = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
            x, (ck, cv) = body(x, (lp, *kv))
            new_k.append(ck)
            new_v.append(cv)
        new_k, new_v = tuple(new_k), tuple(new_v)
    else:
        xs = (
            stack_layers(layers) if split else layers,
            cache.k if cache else None,
            cache.v if cache else None,
        )
        x, (new_k, new_v) = jax.lax.scan(body, x, xs)
    hidden = rms_norm(x, params["final_norm"], eps)
    if cache is None:
        return hidden, None
    new_cache = KVCache(
        k=new_k, v=new_v, pos=cache_pos, index=cache.index + valid.sum(axis=1).astype(jnp.int32)
    )
    return hidden, new_cache


def lm_head(params: Params) -> jax.Array:
    """The output projection [V, D] (the embedding when tied)."""
    return params["lm_head"] if "lm_head" in params else params["embed"]


def logits_from_hidden(params: Params, hidden: jax.Array, *, head_first: bool = False) -> jax.Array:
    """Float32 logits [..., V] from final hidden states [..., D].

    head_first: compute them as head [V, D] x hidden^T and transpose back, which XLA:CPU runs faster
    for a decode step's few rows (the head is already output-major; see `dense_out_major`): at batch
    64, SmolLM2-135M's head took 23.4 ms a step the usual way and 18.3-18.6 ms head-first."""
    head = lm_head(params).astype(hidden.dtype)
    if head_first:
        return _weight_first(head, hidden, jnp.float32)
    return jnp.einsum("...D,VD->...V", hidden, head, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype", "remat"))
def logits(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    valid: jax.Array | None = None,
    compute_dtype: Any = None,
    remat: Callable[..., Any] | None = None,
) -> jax.Array:
    """Full-sequence float32 logits [B, T, V] (jitted; positions default to 0..T-1)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, _ = forward(params, cfg, tokens, positions, valid=valid, compute_dtype=compute_dtype, remat=remat)
    return logits_from_hidden(params, hidden)


def param_bytes(params: Params) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))
