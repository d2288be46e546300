"""Grouped-query attention with a mask derived from positions, and its parameters.

A key at position p is visible to a query at position q iff 0 <= p <= q (and, in a sliding-window
layer of window W, q - p < W: the query and the W - 1 tokens before it, as HF counts it). Padding and
empty cache slots carry position -1, so one code path serves the full forward, cached prefill and
one-token decode, and a padded row computes exactly what the unpadded row would (masked keys get
probability 0).

A query may also see keys ahead of it, up to its `reach` (a position >= its own; default its own): the
image tokens of Gemma 3's vision-language model see every token of their image, HF's bidirectional
"blockwise" mask. A window still counts back from the query's own position.

The options a family passes through `LayerContext.attend`: `scale` (the score multiplier, default
head_dim ** -0.5; Gemma's query_pre_attn_scalar ** -0.5), `softcap` (scores -> c * tanh(scores / c)
before the mask, Gemma 2) and `window` (a Python int, or a traced scalar when the layers are scanned
and only some are windowed).

`bidirectional_attention` is the unmasked attention of the vision encoders, every token seeing every
other.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mllmjax.models.params import ParamSpec

Window = int | jax.Array | None  # a sliding window, static or traced; None: the whole causal past

MASKED = -1e30  # finite, so a row with no visible key gives a uniform (not NaN) softmax
CAUSAL_BLOCK = 64  # the smallest query block of `attention_causal`
CAUSAL_MAX_BLOCKS = 8


def projection_specs(d: int, n: int, k: int, h: int) -> dict[str, ParamSpec]:
    """q, k, v [D, heads, H] and o [N, H, D] of an attention layer with n query and k kv heads."""
    return {
        "q": ParamSpec((d, n, h), ("embed", "heads", "head_dim")),
        "k": ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        "v": ParamSpec((d, k, h), ("embed", "kv_heads", "head_dim")),
        "o": ParamSpec((n, h, d), ("heads", "head_dim", "embed")),
    }


def qkv_bias_specs(n: int, k: int, h: int) -> dict[str, ParamSpec]:
    return {
        "q_bias": ParamSpec((n, h), ("heads", "head_dim")),
        "k_bias": ParamSpec((k, h), ("kv_heads", "head_dim")),
        "v_bias": ParamSpec((k, h), ("kv_heads", "head_dim")),
    }


def visible(
    q_pos: jax.Array, k_pos: jax.Array, window: Window = None, reach: jax.Array | None = None
) -> jax.Array:
    """[B, T, S]: key s is visible to query t iff 0 <= k_pos <= reach (default q_pos), and q_pos - k_pos
    < window. reach [B, T]: how far ahead each query sees (see the module docstring)."""
    upper = q_pos if reach is None else reach
    seen = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= upper[:, :, None])
    if window is None:
        return seen
    return seen & (q_pos[:, :, None] - k_pos[:, None, :] < window)


def scores_of(scores: jax.Array, softcap: float | None) -> jax.Array:
    """Soft-capped attention scores c * tanh(s / c) (float32), or the scores themselves."""
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    cache_layout: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    window: Window = None,
    reach: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query attention with the position-derived causal mask.

    q: [B, T, N, H]; k, v: [B, S, K, H], or with cache_layout the per-layer cache's k [B, K, H, S] and
    v [B, K, S, H]; q_pos: [B, T]; k_pos: [B, S] (-1 = not a key). scale, softcap, window, reach: see
    the module docstring.
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
    # form one [G*T, H] block, so each (row, kv head) is one plain [G*T, H] x [H, S] product with the
    # contracted dims minor in both operands, the layout XLA:CPU runs fastest.
    qh = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
    scale = h**-0.5 if scale is None else scale
    scores = jnp.einsum(f"BKMH,{k_minor}->BKMS", qh, k, preferred_element_type=jnp.float32) * scale
    scores = scores_of(scores.reshape(b, kv, g, t, -1), softcap)
    scores = jnp.where(visible(q_pos, k_pos, window, reach)[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
    out = jnp.einsum("BKMS,BKSH->BKMH", probs, v)  # [B, K, G*T, H]
    return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def bidirectional_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None
) -> jax.Array:
    """Multi-head attention in which every query sees every key, with no mask: a vision encoder's
    attention over one image's patches. q, k, v: [B, T, N, H] (as many kv heads as query heads);
    scale: the score multiplier (default H ** -0.5). Scores and softmax in float32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


def causal_blocks(t: int) -> int:
    """How many query blocks `attention_causal` splits a sequence of t tokens into (1: no split)."""
    block = max(CAUSAL_BLOCK, -(-t // CAUSAL_MAX_BLOCKS))
    return t // block if t % block == 0 else 1


def attention_causal(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    reach: jax.Array | None = None,
    **options: Any,
) -> jax.Array:
    """`attention` of a sequence over itself (k, v: [B, T, K, H], the queries' own tokens), skipping the
    key blocks after each query block.

    Query block i attends to keys 0 .. end of block i only, under the same position mask: exact as long
    as positions increase along each row's valid tokens, as every batch here is laid out (left-padded
    prompts, then completions). With n blocks (`causal_blocks`) the products and the saved
    probabilities shrink to (n + 1) / 2n of the full square. options: `attention`'s scale, softcap
    and window. With a reach (queries that see keys ahead of them) it is the full square, unsplit.
    """
    if reach is not None:
        return attention(q, k, v, q_pos, k_pos, reach=reach, **options)
    t = q.shape[1]
    n = causal_blocks(t)
    block = t // n
    outs = []
    for i in range(n):
        rows, keys = slice(i * block, (i + 1) * block), slice(0, (i + 1) * block)
        outs.append(attention(q[:, rows], k[:, keys], v[:, keys], q_pos[:, rows], k_pos[:, keys], **options))
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


def attention_shared_prompt(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    prompt_len: int,
    rows: int,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    window: Window = None,
) -> jax.Array:
    """The completions' part of attention over shared-prompt groups: q, k, v [B, P + S*C, ...] and
    q_pos, k_pos [B, P + S*C] in the layout of `transformer.fold_groups` (a prompt of P tokens, then S
    completions of C); returns the S*C completion tokens' outputs [B, S*C, N, H].

    Each completion attends to the prompt's keys and its own, under the position mask, with one softmax
    over both. The prompt's keys are read in place by all S completions (one [S*C, H] x [H, P] product
    per kv head, no copy per completion), and the completion is split into `causal_blocks` query blocks
    that read their own keys up to the block's end, as `attention_causal` does."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    g, p, s = n // kv, prompt_len, rows
    c = (t - p) // s
    scale = h**-0.5 if scale is None else scale
    kp, vp, kpos_p = k[:, :p], v[:, :p], k_pos[:, :p]
    qc = q[:, p:].reshape(b, s, c, kv, g, h)  # head n reads kv head n // g, as in `attention`
    kc, vc = k[:, p:].reshape(b, s, c, kv, h), v[:, p:].reshape(b, s, c, kv, h)
    qpos, kpos_c = q_pos[:, p:].reshape(b, s, c), k_pos[:, p:].reshape(b, s, c)

    blocks = causal_blocks(c)
    size = c // blocks
    f32 = jnp.float32
    outs = []
    for i in range(blocks):
        rows_i, keys_i = slice(i * size, (i + 1) * size), slice(0, (i + 1) * size)
        qi, qpos_i = qc[:, :, rows_i], qpos[:, :, rows_i]
        head = jnp.einsum("BSCKGH,BPKH->BSKGCP", qi, kp, preferred_element_type=f32) * scale
        own = jnp.einsum("BSCKGH,BSDKH->BSKGCD", qi, kc[:, :, keys_i], preferred_element_type=f32) * scale
        # `visible`'s mask: the S completions' queries against the prompt's keys, then each against its own.
        seen_head = visible(qpos_i.reshape(b, s * size), kpos_p, window).reshape(b, s, size, p)
        seen_own = visible(qpos_i.reshape(b * s, size), kpos_c[:, :, keys_i].reshape(b * s, -1), window)
        head = jnp.where(seen_head[:, :, None, None], scores_of(head, softcap), MASKED)
        own = jnp.where(seen_own.reshape(b, s, size, -1)[:, :, None, None], scores_of(own, softcap), MASKED)
        probs = jax.nn.softmax(jnp.concatenate([head, own], axis=-1), axis=-1).astype(v.dtype)
        out = jnp.einsum("BSKGCP,BPKH->BSCKGH", probs[..., :p], vp)
        outs.append(out + jnp.einsum("BSKGCD,BSDKH->BSCKGH", probs[..., p:], vc[:, :, keys_i]))
    out = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=2)
    return out.reshape(b, s * c, n, h)
