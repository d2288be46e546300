"""The GRPO/PPO loss: chunked per-token log-probs, clipped policy gradient, KL to a reference.

Design decisions:
- Log-probs are computed from the final hidden states and the LM head in chunks of tokens, so the
  float32 logits of the whole batch ([B, T, V]: 400 MB for SmolLM2 at 8 x 256) never exist at once.
  Each chunk's gradient is written out (d logp / d logits = (onehot - softmax) / T): the backward needs
  the chunk's softmax only. It is kept from the forward while the softmax of all the chunks together
  stays under `KEEP_SOFTMAX_BYTES` (1 GiB), and otherwise rebuilt from the saved logsumexp by
  recomputing the chunk's logits (one more [C, D] x [D, V] product per chunk); keeping it saves that
  product when memory allows.
- Only the positions that predict completion tokens go through the LM head: batches put every
  completion at or after a static `completion_start` (prompts left-padded to a common width), so the
  prompt's hidden states are sliced off before the head.
- Logits are divided by the sampling temperature before the softmax: the distribution the sampler drew from.
- Aggregation is expressed as per-token weights computed once from the whole (mini)batch's completion
  mask: the loss is sum(weight * per-token loss). Any split of the rows into micro-batches then sums to
  exactly the same loss and gradient, which is what makes gradient accumulation correct.
  - `token`: weight 1/N, N = completion tokens in the whole batch (DAPO-style, the default).
  - `sequence`: weight 1/(n_b * B), the mean per sequence, then over sequences (original GRPO).
  - `dr_grpo`: weight 1/(B * L), L = `LossConfig.max_completion_len` (the sampler's max new tokens),
    or the batch's completion width T - completion_start when unset (Dr. GRPO's constant normaliser).
- KL to the frozen reference is added to the per-token loss (beta * kl) before aggregation, with
  Schulman's estimators k1, k2, k3 of KL(pi || ref) on tokens sampled from pi.
- Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
  off-policy RL training"): when the sampler's log-probs are given alongside recomputed old log-probs,
  each token's policy-gradient term is multiplied by min(pi_old / pi_sampler, cap), without gradient.
  Sampler log-probs can instead be passed as the old log-probs themselves (skipping the recompute).
- Entropy (full vocabulary, completion tokens) is computed in the same chunk. It is a metric, and with
  `entropy_coef` > 0 a loss term (-coef * entropy, aggregated with the loss's weights): its gradient
  -p (log p + H) is then written out in the chunk's backward too.
- The ratio and the loss come in the variants of the field, each a switch of `LossConfig`:
  - `ratio_level="token"`: r_t = pi(y_t) / pi_old(y_t), one ratio per token (PPO, GRPO, DAPO).
  - `ratio_level="sequence"` (GSPO, Zheng et al. 2025, arXiv 2507.18071): s = exp(mean_t(logp - old))
    over the row's completion tokens, one ratio per sequence, clipped as a whole (GSPO's own ranges are
    tiny: 3e-4 / 4e-4); every token of the row carries -min(s A, clip(s) A), so the gradient reaches
    each token as s A / |y| d logp, as in the paper. (GSPO-token, which lets per-token advantages
    through, is the same objective when advantages are per sequence, as all of ours are.)
  - `loss="ppo"`: -min(r A, clip(r) A), the clipped surrogate.
  - `loss="cispo"` (MiniMax-M1, arXiv 2506.13585): -sg(clip(r, 1 - clip_low, 1 + clip_high)) A log pi:
    the clipped ratio is a stop-gradient weight of the REINFORCE term, so a clipped token still passes
    its (weighted) gradient instead of dropping it. clip_low = 1 leaves no lower clip, as MiniMax does.
    The loss value is written as -w A exp(logp - sg(logp)) (the same gradient, the value -w A), so its
    scale reads like the PPO loss's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mllmjax.errors import BadInputError
from mllmjax.settings import DEFAULTS

# ---------------------------------------------------------------------------------------------
# per-token log-probs


def token_logprobs(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    with_entropy: bool = True,
    recompute: bool | None = None,
    softcap: float | None = None,
    entropy_grad: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Float32 log p(targets) and full-vocabulary entropy from hidden states, chunked over tokens.

    hidden: [B, T, D] states that predict `targets` [B, T]; head: [V, D]. Returns (logp [B, T],
    entropy [B, T] or None). At most `chunk_size` tokens' logits [chunk, V] are live at a time.
    For the backward, recompute=False keeps each chunk's softmax (all of [B*T, V] in float32, saved),
    True recomputes each chunk's logits, None (the default) keeps when `keeps_softmax` says so.
    softcap: the model's final-logit soft-cap (logits -> c * tanh(logits / c) before the temperature).
    entropy_grad: let gradient flow back through the entropy too (an entropy term in the loss); without
    it the entropy is a metric and its cotangent is ignored.
    """
    if temperature <= 0:
        raise BadInputError(f"temperature must be > 0 to score log-probs, got {temperature!r}")
    b, t, d = hidden.shape
    n = b * t
    chunk = max(1, min(chunk_size, n))
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = hidden.reshape(n, d)
    y = targets.reshape(n).astype(jnp.int32)
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        y = jnp.pad(y, (0, pad))
    h = h.reshape(n_chunks, chunk, d)
    y = y.reshape(n_chunks, chunk)
    head = head.astype(hidden.dtype)
    # A soft-capped head's backward recomputes the logits anyway (see `_chunk_logprobs`): keep nothing.
    keep = softcap is None and keeps_softmax(n_chunks * chunk, head.shape[0], recompute)
    inv_t = 1.0 / temperature
    ent_grad = with_entropy and entropy_grad
    logp, ent = jax.lax.map(
        lambda xs: _chunk_logprobs(*xs, head, inv_t, with_entropy, keep, softcap, ent_grad), (h, y)
    )
    logp = logp.reshape(-1)[:n].reshape(b, t)
    ent = ent.reshape(-1)[:n].reshape(b, t)
    return logp, (ent if with_entropy else None)


KEEP_SOFTMAX_BYTES = 1 << 30


def keeps_softmax(tokens: int, vocab: int, recompute: bool | None) -> bool:
    """Whether the backward of `token_logprobs` over `tokens` positions keeps the float32 softmax
    (tokens x vocab) from the forward: recompute=None keeps it up to KEEP_SOFTMAX_BYTES."""
    if recompute is None:
        return 4 * tokens * vocab <= KEEP_SOFTMAX_BYTES
    return not recompute


def _chunk_logits(
    hc: jax.Array, head: jax.Array, inv_t: float, softcap: float | None
) -> tuple[jax.Array, Any]:
    """(The chunk's float32 logits [C, V] / T, soft-capped first; tanh of the capped logits or None)."""
    raw = jnp.einsum("CD,VD->CV", hc, head, preferred_element_type=jnp.float32)
    if softcap is None:
        return raw * inv_t, None
    tanh = jnp.tanh(raw / softcap)
    return softcap * tanh * inv_t, tanh


def _chunk_forward(
    hc: jax.Array,
    yc: jax.Array,
    head: jax.Array,
    inv_t: float,
    with_entropy: bool,
    want_probs: bool,
    softcap: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """One chunk: (logp [C], entropy [C] (zeros without it), logsumexp [C], softmax [C, V] or None)."""
    logits, _ = _chunk_logits(hc, head, inv_t, softcap)
    return _forward_from_logits(logits, yc, with_entropy, want_probs)


def _forward_from_logits(
    logits: jax.Array, yc: jax.Array, with_entropy: bool, want_probs: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    peak = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - peak)
    total = jnp.sum(e, axis=-1, keepdims=True)
    lse = (peak + jnp.log(total))[:, 0]
    logp = jnp.take_along_axis(logits, yc[:, None], axis=-1)[:, 0] - lse
    probs = e / total if (with_entropy or want_probs) else None
    ent = lse - jnp.sum(probs * logits, axis=-1) if with_entropy else jnp.zeros_like(logp)
    return logp, ent, lse, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _chunk_logprobs(
    hc: jax.Array,
    yc: jax.Array,
    head: jax.Array,
    inv_t: float,
    with_entropy: bool,
    keep: bool,
    softcap: float | None,
    entropy_grad: bool,
) -> tuple[jax.Array, jax.Array]:
    """(log p(yc) [C], entropy [C]) of the chunk's hidden states hc [C, D] under head [V, D].

    The gradient is written out: d logp / d logits = (onehot(y) - softmax) / T, so the backward needs
    the softmax and nothing else. keep=True saves the chunk's softmax from the forward; keep=False
    saves the logsumexp [C] and recomputes the logits (one more [C, D] x [D, V] product) to rebuild it.
    The entropy's gradient (entropy_grad=True) is d H / d logits = -p (log p + H); it needs log p, so
    keep=True then saves the chunk's logits instead of its softmax (the same size) and the backward
    rebuilds p from them and the logsumexp. Otherwise the entropy is a metric and no gradient flows back
    through it. With a soft-cap the backward also needs tanh of the raw logits (d cap / d raw =
    1 - tanh^2), so it always recomputes the chunk's logits.
    """
    logp, ent, _, _ = _chunk_forward(hc, yc, head, inv_t, with_entropy, False, softcap)
    return logp, ent


def _chunk_logprobs_fwd(
    hc: jax.Array,
    yc: jax.Array,
    head: jax.Array,
    inv_t: float,
    with_entropy: bool,
    keep: bool,
    softcap: float | None,
    entropy_grad: bool,
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    if keep and entropy_grad:  # the backward needs log p: keep the logits (never with a soft-cap)
        logits, _ = _chunk_logits(hc, head, inv_t, softcap)
        logp, ent, lse, _ = _forward_from_logits(logits, yc, with_entropy, False)
        return (logp, ent), (hc, yc, head, logits, lse, ent)
    logp, ent, lse, probs = _chunk_forward(hc, yc, head, inv_t, with_entropy, keep, softcap)
    return (logp, ent), (hc, yc, head, probs if keep else None, lse, ent if entropy_grad else None)


def _chunk_logprobs_bwd(
    inv_t: float,
    with_entropy: bool,
    keep: bool,
    softcap: float | None,
    entropy_grad: bool,
    res: tuple[jax.Array, ...],
    cts: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, None, jax.Array]:
    hc, yc, head, saved, lse, ent = res
    tanh = None
    logits = None
    if keep and entropy_grad:
        logits = saved
        probs = jnp.exp(logits - lse[:, None])
    elif keep:  # never with a soft-cap
        probs = saved
    else:
        logits, tanh = _chunk_logits(hc, head, inv_t, softcap)
        probs = jnp.exp(logits - lse[:, None])
    g = cts[0] * inv_t  # [C]
    onehot = jnp.arange(probs.shape[-1], dtype=yc.dtype)[None, :] == yc[:, None]
    dlogits = jnp.where(onehot, g[:, None], 0.0) - probs * g[:, None]
    if entropy_grad:
        # H = -sum p log p; dH/dlogits_j = -p_j (log p_j + H), and logits = raw / T.
        log_probs = logits - lse[:, None]
        dlogits = dlogits - (cts[1] * inv_t)[:, None] * probs * (log_probs + ent[:, None])
    if tanh is not None:
        dlogits = dlogits * (1.0 - tanh * tanh)
    dlogits = dlogits.astype(hc.dtype)
    dh = jnp.einsum("CV,VD->CD", dlogits, head, preferred_element_type=jnp.float32).astype(hc.dtype)
    dhead = jnp.einsum("CV,CD->VD", dlogits, hc, preferred_element_type=jnp.float32).astype(head.dtype)
    return dh, None, dhead


_chunk_logprobs.defvjp(_chunk_logprobs_fwd, _chunk_logprobs_bwd)


def sequence_logprobs(
    hidden: jax.Array,
    head: jax.Array,
    tokens: jax.Array,
    *,
    completion_start: int = 1,
    **kw: Any,
) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs aligned with `tokens` [B, T]: out[:, t] = log p(tokens[t] | tokens[<t]).

    Only positions t >= completion_start are scored (earlier ones are 0), so the LM head never sees
    the prompt's states. hidden: [B, T, D] from `mllmjax.models.transformer.forward`; head: [V, D].
    """
    t = tokens.shape[1]
    start = max(1, completion_start)
    if start >= t:
        raise BadInputError(f"completion_start {completion_start} leaves no tokens to score in width {t}")
    logp, ent = token_logprobs(hidden[:, start - 1 : t - 1], head, tokens[:, start:], **kw)
    zeros = jnp.zeros((tokens.shape[0], start), jnp.float32)
    logp = jnp.concatenate([zeros, logp], axis=1)
    if ent is not None:
        ent = jnp.concatenate([zeros, ent], axis=1)
    return logp, ent


# ---------------------------------------------------------------------------------------------
# registries

KLEstimator = Callable[[jax.Array, jax.Array], jax.Array]
KL_ESTIMATORS: dict[str, KLEstimator] = {}


def register_kl(name: str) -> Callable[[KLEstimator], KLEstimator]:
    def deco(fn: KLEstimator) -> KLEstimator:
        KL_ESTIMATORS[name] = fn
        return fn

    return deco


@register_kl("k1")
def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """log(pi / ref): unbiased, high variance, can be negative per token."""
    return logp - ref_logp


@register_kl("k2")
def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """0.5 * log(ref / pi)^2: biased, low variance, >= 0."""
    return 0.5 * jnp.square(ref_logp - logp)


@register_kl("k3")
def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """ref/pi - 1 - log(ref/pi): unbiased, >= 0 (the GRPO paper's choice)."""
    log_r = ref_logp - logp
    return jnp.exp(log_r) - 1.0 - log_r


# (completion mask [B, T], dr_grpo's constant length) -> per-token weights [B, T]
Aggregation = Callable[[jax.Array, int], jax.Array]
AGGREGATIONS: dict[str, Aggregation] = {}


def register_aggregation(name: str) -> Callable[[Aggregation], Aggregation]:
    def deco(fn: Aggregation) -> Aggregation:
        AGGREGATIONS[name] = fn
        return fn

    return deco


@register_aggregation("token")
def agg_token(mask: jax.Array, length: int) -> jax.Array:
    m = mask.astype(jnp.float32)
    return m / jnp.maximum(m.sum(), 1.0)


@register_aggregation("sequence")
def agg_sequence(mask: jax.Array, length: int) -> jax.Array:
    m = mask.astype(jnp.float32)
    per_row = jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)  # an empty row contributes 0, not NaN
    return m / (per_row * m.shape[0])


@register_aggregation("dr_grpo")
def agg_dr_grpo(mask: jax.Array, length: int) -> jax.Array:
    m = mask.astype(jnp.float32)
    return m / (m.shape[0] * float(length))


# ---------------------------------------------------------------------------------------------
# the loss


RATIO_LEVELS = ("token", "sequence")
LOSSES = ("ppo", "cispo")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    clip_low: float = DEFAULTS.clip_low
    clip_high: float = DEFAULTS.clip_high
    aggregation: str = DEFAULTS.loss_agg
    beta: float = DEFAULTS.beta
    kl_estimator: str = DEFAULTS.kl
    # dr_grpo's constant: the sampler's max new tokens; None = the batch's completion width.
    max_completion_len: int | None = None
    # Truncated importance sampling cap (applied only when sampler log-probs are given).
    tis_cap: float | None = None
    # One importance ratio per token ("token") or per sequence (GSPO: "sequence").
    ratio_level: str = DEFAULTS.ratio_level
    # The policy-gradient term: "ppo" (clipped surrogate) or "cispo" (clipped IS-weighted REINFORCE).
    loss: str = DEFAULTS.loss
    # Weight of the entropy bonus: the loss gets -entropy_coef * entropy (aggregated like the loss).
    entropy_coef: float = DEFAULTS.entropy_coef

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low <= 1:
            raise BadInputError(f"clip_low must be in [0, 1] (1: no lower clip), got {self.clip_low!r}")
        if not self.clip_high >= 0:
            raise BadInputError(f"clip_high must be >= 0, got {self.clip_high!r}")
        if self.aggregation not in AGGREGATIONS:
            raise BadInputError(
                f"unknown loss aggregation {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}"
            )
        if not self.beta >= 0:
            raise BadInputError(f"beta must be >= 0, got {self.beta!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise BadInputError(
                f"unknown KL estimator {self.kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}"
            )
        if self.max_completion_len is not None and self.max_completion_len <= 0:
            raise BadInputError(f"max_completion_len must be > 0, got {self.max_completion_len!r}")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise BadInputError(f"tis_cap must be > 0, got {self.tis_cap!r}")
        if self.ratio_level not in RATIO_LEVELS:
            raise BadInputError(
                f"unknown ratio level {self.ratio_level!r}; choose one of {', '.join(RATIO_LEVELS)}"
            )
        if self.loss not in LOSSES:
            raise BadInputError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not (self.entropy_coef >= 0 and self.entropy_coef < float("inf")):
            raise BadInputError(f"entropy_coef must be a finite number >= 0, got {self.entropy_coef!r}")
        if self.ratio_level == "sequence" and self.tis_cap is not None:
            raise BadInputError(
                "--tis-cap weights each token by its own sampler ratio, which a sequence-level ratio "
                "(--ratio-level sequence, GSPO) does not have; drop one of them"
            )
        if self.ratio_level == "sequence" and self.loss == "cispo":
            raise BadInputError(
                "--loss cispo weights each token by its own clipped ratio; it does not combine with "
                "--ratio-level sequence (GSPO)"
            )


def aggregation_weights(mask: jax.Array, cfg: LossConfig, completion_width: int | None = None) -> jax.Array:
    """Per-token weights [B, T] of the whole (mini)batch; the loss is sum(weight * token loss).

    completion_width: how many positions of a row can hold completion tokens (dr_grpo's constant when
    `cfg.max_completion_len` is unset); default the mask's width.
    """
    length = cfg.max_completion_len or completion_width or int(mask.shape[1])
    return AGGREGATIONS[cfg.aggregation](mask, length)


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    weights: jax.Array,
    cfg: LossConfig,
    *,
    ref_logp: jax.Array | None = None,
    sampler_logp: jax.Array | None = None,
    token_count: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped policy-gradient loss plus beta * KL (minus entropy_coef * entropy), aggregated with `weights`.

    logp, old_logp, ref_logp, sampler_logp, mask, weights: [B, T]; advantages: [B]. old_logp None means
    stop_gradient(logp) (ratio 1, PPO epoch 0). `token_count` is the number of completion tokens the
    token-mean metrics divide by (the whole batch's when this is one micro-batch of it); default this
    mask's count. Metrics that are sums (`loss`, `policy_loss`, `kl`, `entropy`, `clip_low`,
    `clip_high`, `ratio_mean`, `logp_mismatch_mean`) add up over micro-batches; `ratio_min`/`ratio_max`
    and `logp_mismatch_max` combine by min/max. The `logp_mismatch_*` metrics (only with sampler_logp)
    are the token mean and max of |old - sampler| log-probs: how far the trainer's log-probs of the
    sampled tokens are from the sampler's (sampler/trainer drift; ~0 in float32). `entropy` [B, T]: the
    per-token entropy, needed (with its gradient) when `cfg.entropy_coef` > 0; the term it adds is the
    `entropy_loss` metric. With `cfg.loss == "cispo"` the clip fractions count every clipped token, since
    CISPO's weight is clipped whatever the advantage's sign; with PPO only the side the advantage pushes.
    """
    m = mask.astype(jnp.float32)
    if token_count is None:
        token_count = jnp.maximum(m.sum(), 1.0)
    tok_w = m / token_count
    old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
    if cfg.ratio_level == "sequence":
        # GSPO: exp of the row's mean log-ratio over its completion tokens, the same for all of them.
        per_row = jnp.maximum(m.sum(axis=1, keepdims=True), 1.0)
        log_ratio = jnp.sum(m * (logp - old), axis=1, keepdims=True) / per_row
        ratio = jnp.broadcast_to(jnp.exp(log_ratio), logp.shape)
    else:
        ratio = jnp.exp(logp - old)
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    a = advantages.astype(jnp.float32)[:, None]
    sg_ratio = jax.lax.stop_gradient(ratio)
    if cfg.loss == "cispo":
        # -sg(clip(r)) A log pi, written with exp(logp - sg(logp)) (value 1, gradient d logp).
        pg = -jax.lax.stop_gradient(clipped) * a * jnp.exp(logp - jax.lax.stop_gradient(logp))
        clip_low = sg_ratio < 1.0 - cfg.clip_low
        clip_high = sg_ratio > 1.0 + cfg.clip_high
    else:
        pg = -jnp.minimum(ratio * a, clipped * a)
        # Clipping is active (and the gradient zero) only on the side the advantage pushes toward.
        clip_low = (sg_ratio < 1.0 - cfg.clip_low) & (a < 0)
        clip_high = (sg_ratio > 1.0 + cfg.clip_high) & (a > 0)
    if sampler_logp is not None and cfg.tis_cap is not None:
        tis = jnp.minimum(jnp.exp(old - sampler_logp), cfg.tis_cap)
        pg = pg * jax.lax.stop_gradient(tis)
    policy_loss = jnp.sum(weights * pg)
    per_token = pg
    kl_value = jnp.zeros((), jnp.float32)
    if cfg.beta > 0:
        if ref_logp is None:
            raise BadInputError("beta > 0 needs reference log-probs (ref_logp)")
        kl = KL_ESTIMATORS[cfg.kl_estimator](logp, ref_logp)
        per_token = pg + cfg.beta * kl
        kl_value = jnp.sum(weights * kl)
    elif ref_logp is not None:
        kl_value = jnp.sum(weights * KL_ESTIMATORS[cfg.kl_estimator](logp, ref_logp))
    loss = jnp.sum(weights * per_token)
    on = mask.astype(bool)
    metrics = {
        "loss": loss,
        "policy_loss": policy_loss,
        "kl": jax.lax.stop_gradient(kl_value),
        "clip_low": jnp.sum(tok_w * clip_low),
        "clip_high": jnp.sum(tok_w * clip_high),
        "ratio_mean": jnp.sum(tok_w * sg_ratio),
        "ratio_min": jnp.min(jnp.where(on, sg_ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(on, sg_ratio, -jnp.inf)),
    }
    if entropy is not None and cfg.entropy_coef > 0:
        # The entropy bonus, aggregated like the loss (NaN-free: padding positions are zeroed first).
        bonus = -cfg.entropy_coef * jnp.sum(weights * jnp.where(on, entropy, 0.0))
        loss = loss + bonus
        metrics["loss"] = loss
        metrics["entropy_loss"] = jax.lax.stop_gradient(bonus)
    if sampler_logp is not None:
        # Sampler/trainer drift: |old - sampler| log-prob per completion token (~0 in float32).
        gap = jax.lax.stop_gradient(jnp.abs(old - sampler_logp))
        metrics["logp_mismatch_mean"] = jnp.sum(tok_w * gap)
        metrics["logp_mismatch_max"] = jnp.max(jnp.where(on, gap, 0.0))
    return loss, metrics


SUM_METRICS = ("loss", "policy_loss", "kl", "entropy", "clip_low", "clip_high", "ratio_mean",
               "logp_mismatch_mean", "entropy_loss")  # fmt: skip
MIN_METRICS = ("ratio_min",)
MAX_METRICS = ("ratio_max", "logp_mismatch_max")


def combine_metrics(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Merge two micro-batches' metrics (sums add, extremes take min/max)."""
    out = {k: a[k] + b[k] for k in a if k not in MIN_METRICS + MAX_METRICS}
    for k in MIN_METRICS:
        out[k] = jnp.minimum(a[k], b[k])
    for k in MAX_METRICS:
        if k in a:
            out[k] = jnp.maximum(a[k], b[k])
    return out
