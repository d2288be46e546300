"""The driver every family runs through: embed, the family's block over the layers, final norm, logits.

- The layers are stacked on a leading axis, so the forward is one `lax.scan` over them: compile time
  does not grow with depth, and remat wraps one body. A caller may pass the layers as a sequence of
  per-layer trees (`split_layers`) instead; they are then unrolled (decode loops and training on CPU,
  where the scan's stacking copies cost time), as they are with a per-layer cache.
- A model whose layers differ in their parameters (Qwen3-MoE with dense MLPs among its expert layers)
  keeps the weights only some layers have in stacks of their own (`ModelConfig.layer_stacks`); its
  forward always unrolls, over per-layer trees that merge each layer's slices (`split_params`).
- Norms, RoPE, softmax and logits are float32 whatever the compute dtype; the KV cache is kept in the
  compute dtype.
- The LM head is stored as [vocab, embed] like the embedding, so tied and untied models share one code
  path and the loss can slice the vocabulary for chunked log-softmax.
- A caller may run the layers from input embeddings of its own (`embeds=`) instead of token ids: a
  vision-language model's text embeddings (`embed_tokens`) with image features put in at its image
  tokens (`mllmjax.models.vision.llava`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllmjax.models.blocks.adapters import Adapted
from mllmjax.models.blocks.cpu import OutMajor, out_major_layer, split_layers, stack_layers, weight_first
from mllmjax.models.blocks.kernels import Kernel
from mllmjax.models.cache import KVCache, ring_write, write_rows
from mllmjax.models.config import ModelConfig
from mllmjax.models.layer import LayerContext
from mllmjax.models.params import Params, ParamSpec, map_specs
from mllmjax.models.registry import family

XLA = Kernel()


def init_params(cfg: ModelConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal(0, 0.02) weights, identity norms, zero biases), for tests and benches."""
    specs = cfg.param_specs()
    leaves: list[str] = []
    map_specs(lambda path, _: leaves.append(path), specs)
    keys = dict(zip(leaves, jax.random.split(rng, len(leaves)), strict=True))

    def make(path: str, spec: ParamSpec) -> jax.Array:
        name = path.rsplit("/", 1)[-1]
        if name.endswith("norm"):  # the identity norm: ones, or zeros for (1 + w) norms
            return jnp.full(spec.shape, cfg.norm_identity, dtype)
        if name.endswith("bias"):
            return jnp.zeros(spec.shape, dtype)
        return (0.02 * jax.random.normal(keys[path], spec.shape, jnp.float32)).astype(dtype)

    return map_specs(make, specs)


def embed_tokens(params: Params, cfg: ModelConfig, tokens: jax.Array, dtype: Any) -> jax.Array:
    """The input embeddings [B, T, D] of tokens [B, T] in the compute dtype, times the family's
    `embed_multiplier` if it has one (in that dtype, as HF scales it: Gemma's scaled embedding)."""
    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    multiplier = cfg.embed_multiplier()
    return x if multiplier is None else x * jnp.asarray(multiplier, dtype)


def cast_layer(lp: Params, dtype: Any) -> Params:
    """A layer's params in the compute dtype; a LoRA `Adapted` weight casts its arrays, not its key."""
    return jax.tree.map(lambda p: p.astype(dtype), lp, is_leaf=lambda n: isinstance(n, Adapted))


def layer_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """A layer's param specs, without the leading layer axis: those of "layers" and of every stack of
    some layers' weights (`ModelConfig.layer_stacks`; a given layer has the ones of its stacks)."""
    specs = cfg.param_specs()
    return {
        name: ParamSpec(s.shape[1:], s.axes[1:])
        for stack in ("layers", *cfg.layer_stacks())
        for name, s in specs[stack].items()
    }


def split_params(params: Params, cfg: ModelConfig) -> Params:
    """params with "layers" as a tuple of per-layer trees (`split_layers`), each merged with its slot
    of every stack that holds that layer (`ModelConfig.layer_stacks`; the stacks leave the dict). As
    given when the layers are split already."""
    if isinstance(params["layers"], (tuple, list)):
        return params
    stacks = cfg.layer_stacks()
    layers = [dict(lp) for lp in split_layers(params["layers"], cfg.num_layers)]
    for name, numbers in stacks.items():
        if name in params:  # (a LoRA adapter tree has "layers" only)
            for i, part in zip(numbers, split_layers(params[name], len(numbers)), strict=True):
                layers[i].update(part)
    return {**{k: v for k, v in params.items() if k not in stacks}, "layers": tuple(layers)}


def join_params(params: Params, cfg: ModelConfig) -> Params:
    """The inverse of `split_params` (for gradients): per-layer trees stacked back into "layers" and
    the stacks of some layers. As given when the layers are stacked."""
    layers = params["layers"]
    if not isinstance(layers, (tuple, list)):
        return params
    specs = cfg.param_specs()
    out = {k: v for k, v in params.items() if k != "layers"}
    rest = [dict(lp) for lp in layers]
    for name, numbers in cfg.layer_stacks().items():
        keys = [k for k in specs[name] if k in rest[numbers[0]]]
        if keys:
            out[name] = stack_layers([{k: rest[i].pop(k) for k in keys} for i in numbers])
    out["layers"] = stack_layers(rest)
    return out


def out_major_layers(params: Params, cfg: ModelConfig, merge_adapters: bool = True) -> Params:
    """params with the layers as a tuple of per-layer trees, their matrices output-major (`OutMajor`):
    what a decode loop on the CPU takes, sliced and transposed once outside the loop. LoRA adapters
    are merged into that copy, or kept beside it with merge_adapters=False (`out_major_layer`)."""
    specs = layer_specs(cfg)
    split = split_params(params, cfg)
    return {**split, "layers": tuple(out_major_layer(lp, specs, merge_adapters) for lp in split["layers"])}


def _run_layers(
    body: Callable[..., Any],
    x: jax.Array,
    layers: Any,
    cache: KVCache | None,
    cfg: ModelConfig,
    unrolled: bool,
) -> tuple[jax.Array, Any, Any, Any]:
    """x through every layer's body, scanned or unrolled; returns (x, new keys, new values, the sum
    over layers of the blocks' aux outputs)."""
    split = isinstance(layers, (tuple, list))
    if unrolled:
        # A caller looping over decode steps, or differentiating, passes the layers pre-sliced
        # (`split_layers`, outside its loop or its grad); stacked layers are sliced here.
        new_k, new_v, auxes = [], [], []
        for i, lp in enumerate(layers if split else split_layers(layers, cfg.num_layers)):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x, (kv, aux) = body(x, (lp, kv, i))
            new_k.append(kv[0] if kv is not None else None)
            new_v.append(kv[1] if kv is not None else None)
            auxes.append(aux)
        new_k, new_v = tuple(new_k), tuple(new_v)
        if cache is not None and not cache.per_layer:  # a stacked cache (a mixed model's unrolled layers)
            new_k, new_v = jnp.stack(new_k), jnp.stack(new_v)
        return x, new_k, new_v, jax.tree.map(lambda *a: sum(a), *auxes)
    kv = (cache.k, cache.v) if cache is not None else None
    xs = (stack_layers(layers) if split else layers, kv, jnp.arange(cfg.num_layers, dtype=jnp.int32))
    x, (new, aux) = jax.lax.scan(body, x, xs)
    aux = jax.tree.map(lambda a: a.sum(axis=0), aux)
    return (x, *new, aux) if new is not None else (x, None, None, aux)


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype", "remat", "kernel", "with_aux", "shared"))
def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array | None,
    positions: jax.Array,
    *,
    embeds: jax.Array | None = None,
    valid: jax.Array | None = None,
    cache: KVCache | None = None,
    compute_dtype: Any = None,
    remat: Callable[..., Any] | None = None,
    kernel: Kernel = XLA,
    rope: Any = None,
    with_aux: bool = False,
    shared: tuple[int, int] | None = None,
    reach: jax.Array | None = None,
) -> Any:
    """Run the model; return (final-normed hidden states [B, T, D], updated cache or None), and with
    with_aux a third item: the sum over layers of what the family's blocks report besides
    (a dict of arrays, e.g. an MoE router's statistics; {} for a dense family).

    params["layers"]: stacked, or a sequence of per-layer trees (`split_params`; then unrolled).
    tokens, positions: [B, T] int. valid: [B, T] bool, False for padding (default all True).
    embeds: [B, T, D] input embeddings to run the layers from instead of embedding tokens (then None):
    the first layer's input as given, without the family's `embed_multiplier`, which `embed_tokens`
    applies to the token embeddings a caller builds them from (HF scales inside the embedding, before
    a multimodal model puts its image features in).
    With a cache, the T new tokens are written at each row's `cache.index`, and attend to everything
    already cached plus themselves; invalid tokens are stored with position -1 (never attended) and do
    not advance the row's index. Windowed layers keep ring buffers of their window instead
    (`mllmjax.models.cache`), into which padding never goes. Without one, positions must increase along each row's valid tokens.
    remat: a `jax.checkpoint` policy to recompute the layer body in the backward pass, or None.
    kernel: the attention backend of a forward without a cache. rope: the family's rope tables of
    these positions, if the caller has them (default: computed here).
    shared: (P, S) when the rows are shared-prompt groups (`fold_groups`): a prompt of P tokens, then
    S completions that each continue it and see only it and themselves (`LayerContext.shared`). No cache.
    reach: [B, T] positions, how far ahead each token sees (`LayerContext.reach`; None: causal).
    """
    if shared is not None and cache is not None:
        raise ValueError("a forward over shared-prompt groups takes no cache")
    if (tokens is None) == (embeds is None):
        raise ValueError("forward takes exactly one of tokens and embeds")
    fam = family(cfg)
    cdt = jnp.dtype(compute_dtype) if compute_dtype is not None else params["embed"].dtype
    if valid is None:
        valid = jnp.ones(positions.shape, bool)
    positions = positions.astype(jnp.int32)
    key_pos = jnp.where(valid, positions, -1)
    cache_pos = write_rows(cache.pos, key_pos, cache.index) if cache is not None else key_pos
    ring = ring_write(cache.ring_pos, key_pos) if cache is not None and cache.ring_pos is not None else None
    ctx = LayerContext(
        rope=fam.rope(cfg, positions) if rope is None else rope,
        q_pos=positions,
        k_pos=cache_pos,
        index=cache.index if cache is not None else None,
        per_layer=cache is not None and cache.per_layer,
        kernel=kernel,
        valid=valid,
        ring=ring,
        windows=cache.windows if cache is not None else (),
        shared=shared,
        reach=None if reach is None else reach.astype(jnp.int32),
    )
    x = embed_tokens(params, cfg, tokens, cdt) if embeds is None else embeds.astype(cdt)  # [B, T, D]

    def body(x: jax.Array, layer: tuple[Params, Any, Any]) -> tuple[jax.Array, Any]:
        lp, kv, index = layer
        out = fam.block(cfg, cast_layer(lp, cdt), x, kv, ctx.at(index))
        x, kv, aux = out if len(out) == 3 else (*out, {})
        return x, (kv, aux)

    mixed = bool(cfg.layer_stacks())  # layers of different parameters: unrolled, never scanned
    if mixed:
        params = split_params(params, cfg)
    layers = params["layers"]
    unrolled = ctx.per_layer or mixed or (cache is None and isinstance(layers, (tuple, list)))
    if remat is not None:
        # Under scan, XLA cannot merge the backward's recomputation with the forward (JAX's docs on
        # jax.checkpoint); unrolled it would, and keep every activation after all.
        body = jax.checkpoint(body, policy=remat, prevent_cse=unrolled)
    x, new_k, new_v, aux = _run_layers(body, x, layers, cache, cfg, unrolled)
    hidden = cfg.final_norm(x, params["final_norm"])
    new_cache = None
    if cache is not None:
        index = cache.index + valid.sum(axis=1).astype(jnp.int32)
        ring_pos = ring.new_pos if ring is not None else None
        new_cache = cache.replace(k=new_k, v=new_v, pos=cache_pos, index=index, ring_pos=ring_pos)
    return (hidden, new_cache, aux) if with_aux else (hidden, new_cache)


def fold_groups(x: jax.Array, prompt_len: int, rows: int) -> jax.Array:
    """Rows [B, T, ...] whose first `prompt_len` columns are equal within each run of `rows` rows (a
    group's left-padded prompt) -> groups [B / rows, P + rows * (T - P), ...]: the prompt once, then
    the rows' completions one after another, the layout of `forward(..., shared=(P, rows))`."""
    b, t = x.shape[:2]
    groups, c = b // rows, t - prompt_len
    completions = x[:, prompt_len:].reshape(groups, rows * c, *x.shape[2:])
    return jnp.concatenate([x[::rows, :prompt_len], completions], axis=1)


def unfold_groups(hidden: jax.Array, prompt_len: int, rows: int) -> jax.Array:
    """The inverse of `fold_groups` for what predicts the completions: hidden [B / rows, P + rows * C,
    D] -> [B, 1 + C, D], each row's last prompt state (which predicts its first completion token), then
    its completion's states."""
    groups, width, d = hidden.shape
    c = (width - prompt_len) // rows
    last = jnp.repeat(hidden[:, prompt_len - 1 : prompt_len], rows, axis=0)
    return jnp.concatenate([last, hidden[:, prompt_len:].reshape(groups * rows, c, d)], axis=1)


def lm_head(params: Params) -> jax.Array:
    """The output projection [V, D] (the embedding when tied)."""
    return params["lm_head"] if "lm_head" in params else params["embed"]


def logits_from_hidden(
    params: Params, hidden: jax.Array, *, head_first: bool = False, softcap: float | None = None
) -> jax.Array:
    """Float32 logits [..., V] from final hidden states [..., D]. head_first: computed as head [V, D] x
    hidden^T and transposed back, which XLA:CPU runs faster for a decode step's few rows. softcap:
    the config's `final_logit_softcap` (logits -> c * tanh(logits / c), Gemma 2)."""
    head = lm_head(params).astype(hidden.dtype)
    if head_first:
        out = weight_first(head, hidden, jnp.float32)
    else:
        out = jnp.einsum("...D,VD->...V", hidden, head, preferred_element_type=jnp.float32)
    return out if softcap is None else softcap * jnp.tanh(out / softcap)


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype", "remat"))
def logits(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array | None,
    positions: jax.Array | None = None,
    valid: jax.Array | None = None,
    compute_dtype: Any = None,
    remat: Callable[..., Any] | None = None,
    *,
    embeds: jax.Array | None = None,
) -> jax.Array:
    """Full-sequence float32 logits [B, T, V] (jitted; positions default to 0..T-1); of tokens, or of
    input embeddings `embeds` [B, T, D] (see `forward`)."""
    if positions is None:
        shape = tokens.shape if embeds is None else embeds.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)
    hidden, _ = forward(
        params, cfg, tokens, positions, embeds=embeds, valid=valid, compute_dtype=compute_dtype, remat=remat
    )
    return logits_from_hidden(params, hidden, softcap=cfg.final_logit_softcap)


def param_bytes(params: Params) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


__all__ = [
    "XLA",
    "KVCache",
    "Kernel",
    "OutMajor",
    "embed_tokens",
    "fold_groups",
    "forward",
    "init_params",
    "layer_specs",
    "lm_head",
    "logits",
    "logits_from_hidden",
    "out_major_layers",
    "param_bytes",
    "split_layers",
    "split_params",
    "join_params",
    "stack_layers",
    "unfold_groups",
]
