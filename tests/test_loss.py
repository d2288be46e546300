"""The GRPO loss against an independent numpy reference, and chunked log-probs against the naive ones."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllmjax import models
from mllmjax.errors import BadInputError
from mllmjax.loss import (
    KEEP_SOFTMAX_BYTES,
    LossConfig,
    aggregation_weights,
    grpo_loss,
    keeps_softmax,
    sequence_logprobs,
    token_logprobs,
)
from mllmjax.models import transformer

B, T = 6, 10


def _numpy_loss(logp, old, adv, mask, ref, sampler, cfg: LossConfig, width: int):
    """float64 forward and analytic d loss / d logp, written from the formulas, not from loss.py."""
    m = mask.astype(np.float64)
    if cfg.aggregation == "token":
        w = m / max(m.sum(), 1.0)
    elif cfg.aggregation == "sequence":
        w = m / (np.maximum(m.sum(1, keepdims=True), 1.0) * m.shape[0])
    else:
        w = m / (m.shape[0] * (cfg.max_completion_len or width))
    old_eff = logp if old is None else old
    r = np.exp(logp - old_eff)
    a = adv[:, None]
    lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
    pg = -np.minimum(r * a, np.clip(r, lo, hi) * a)
    # The unclipped branch is the minimum (and carries gradient) unless the ratio has left the trust
    # region in the direction the advantage pushes.
    active = np.where(a >= 0, r <= hi, r >= lo)
    dpg = np.where(active, -a * r, 0.0)
    if sampler is not None and cfg.tis_cap is not None:
        tis = np.minimum(np.exp(old_eff - sampler), cfg.tis_cap)
        pg, dpg = pg * tis, dpg * tis
    log_r = ref - logp
    if cfg.kl_estimator == "k1":
        kl, dkl = -log_r, np.ones_like(log_r)
    elif cfg.kl_estimator == "k2":
        kl, dkl = 0.5 * log_r**2, -log_r
    else:
        kl, dkl = np.exp(log_r) - 1 - log_r, 1 - np.exp(log_r)
    loss = np.sum(w * (pg + cfg.beta * kl))
    grad = w * (dpg + cfg.beta * dkl)
    on = mask.astype(bool)
    n = max(m.sum(), 1.0)
    metrics = {
        "loss": loss,
        "policy_loss": np.sum(w * pg),
        "kl": np.sum(w * kl),
        "clip_low": np.sum(on & (r < lo) & (a < 0)) / n,
        "clip_high": np.sum(on & (r > hi) & (a > 0)) / n,
        "ratio_mean": np.sum(m * r) / n,
        "ratio_min": r[on].min(),
        "ratio_max": r[on].max(),
    }
    return loss, grad, metrics


def _random_inputs(seed: int):
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-4.0, -0.1, (B, T))
    old = logp + rng.normal(0.0, 0.3, (B, T))
    ref = logp + rng.normal(0.0, 0.5, (B, T))
    sampler = old + rng.normal(0.0, 0.4, (B, T))
    adv = rng.normal(size=B)
    adv[1] = 0.0
    mask = np.zeros((B, T), bool)
    lengths = [T, 1, 0, 5, 7, 3]  # includes a one-token and an empty row
    for b, n in enumerate(lengths):
        if n:
            mask[b, T - n :] = True
    mask[3, 6] = False  # a hole
    return logp, old, adv, mask, ref, sampler


@pytest.mark.parametrize(
    "aggregation,estimator", list(itertools.product(["token", "sequence", "dr_grpo"], ["k1", "k2", "k3"]))
)
def test_loss_and_grad_match_numpy(aggregation: str, estimator: str) -> None:
    cfg = LossConfig(aggregation=aggregation, kl_estimator=estimator, beta=0.3)
    logp, old, adv, mask, ref, _ = _random_inputs(len(aggregation) * 10 + int(estimator[1]))
    want_loss, want_grad, want_metrics = _numpy_loss(logp, old, adv, mask, ref, None, cfg, T)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    weights = aggregation_weights(jnp.asarray(mask), cfg)

    def loss_fn(lp):
        return grpo_loss(lp, f32(old), f32(adv), jnp.asarray(mask), weights, cfg, ref_logp=f32(ref))

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(f32(logp))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-7, err_msg=key)
    assert want_metrics["clip_low"] + want_metrics["clip_high"] > 0  # the inputs exercise clipping


def test_numpy_reference_gradient_is_right() -> None:
    """The analytic gradient of the numpy reference agrees with its own central differences."""
    for aggregation, estimator in itertools.product(["token", "sequence", "dr_grpo"], ["k1", "k2", "k3"]):
        cfg = LossConfig(aggregation=aggregation, kl_estimator=estimator, beta=0.3, tis_cap=1.5)
        logp, old, adv, mask, ref, sampler = _random_inputs(7)
        _, grad, _ = _numpy_loss(logp, old, adv, mask, ref, sampler, cfg, T)
        h = 1e-6
        fd = np.zeros_like(logp)
        for idx in np.ndindex(*logp.shape):
            up, down = logp.copy(), logp.copy()
            up[idx] += h
            down[idx] -= h
            fd[idx] = (
                _numpy_loss(up, old, adv, mask, ref, sampler, cfg, T)[0]
                - _numpy_loss(down, old, adv, mask, ref, sampler, cfg, T)[0]
            ) / (2 * h)
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-9)


def test_epoch_zero_ratio_one_and_truncated_is() -> None:
    cfg = LossConfig(beta=0.0, tis_cap=1.2, max_completion_len=16, aggregation="dr_grpo")
    logp, old, adv, mask, _, sampler = _random_inputs(3)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    weights = aggregation_weights(jnp.asarray(mask), cfg)
    # old=None: ratio exp(logp - stop_gradient(logp)) = 1; TIS weight uses logp as the old policy.
    want_loss, want_grad, want_m = _numpy_loss(logp, None, adv, mask, logp, sampler, cfg, T)

    def loss_fn(lp):
        return grpo_loss(lp, None, f32(adv), jnp.asarray(mask), weights, cfg, sampler_logp=f32(sampler))

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(f32(logp))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    assert float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0
    assert float(metrics["kl"]) == 0.0


def test_beta_zero_adds_no_kl_and_beta_positive_needs_reference() -> None:
    logp, old, adv, mask, ref, _ = _random_inputs(4)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    w = aggregation_weights(jnp.asarray(mask), LossConfig())
    with_kl, _ = grpo_loss(
        f32(logp), f32(old), f32(adv), jnp.asarray(mask), w, LossConfig(beta=0.5), ref_logp=f32(ref)
    )
    no_kl, m = grpo_loss(
        f32(logp), f32(old), f32(adv), jnp.asarray(mask), w, LossConfig(beta=0.0), ref_logp=f32(ref)
    )
    assert float(with_kl) != float(no_kl)
    assert float(no_kl) == float(m["policy_loss"])
    with pytest.raises(BadInputError, match="reference"):
        grpo_loss(f32(logp), f32(old), f32(adv), jnp.asarray(mask), w, LossConfig(beta=0.1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"aggregation": "mean"}, "'mean'"),
        ({"kl_estimator": "k4"}, "'k4'"),
        ({"clip_low": 1.5}, "1.5"),
        ({"beta": -1.0}, "-1.0"),
        ({"tis_cap": 0.0}, "0.0"),
    ],
)
def test_config_rejects_bad_values(kwargs, match) -> None:
    with pytest.raises(BadInputError, match=match):
        LossConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny():
    cfg = models.tiny("qwen2")
    assert not cfg.tie_word_embeddings
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 12)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), tokens.shape)
    hidden, _ = transformer.forward(params, cfg, tokens, pos)
    return cfg, params, tokens, hidden


def _naive(params, hidden, tokens, temperature):
    logits = transformer.logits_from_hidden(params, hidden)[:, :-1] / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, ent


def _entropy64(params, hidden, temperature):
    logits = np.asarray(transformer.logits_from_hidden(params, hidden)[:, :-1], np.float64) / temperature
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


@pytest.mark.parametrize("chunk,recompute", [(7, True), (5, False), (1000, True), (6, None)])
def test_chunked_logprobs_match_naive(tiny, chunk: int, recompute: bool) -> None:
    _, params, tokens, hidden = tiny
    head = transformer.lm_head(params)
    want_logp, _ = _naive(params, hidden, tokens, 0.7)
    logp, ent = token_logprobs(
        hidden[:, :-1], head, tokens[:, 1:], temperature=0.7, chunk_size=chunk, recompute=recompute
    )
    np.testing.assert_allclose(np.asarray(logp), np.asarray(want_logp), atol=1e-6, rtol=0)
    # Entropy (~5.5 here) is compared in relative terms against float64: 1e-6 absolute is 2 ulps.
    np.testing.assert_allclose(np.asarray(ent), _entropy64(params, hidden, 0.7), rtol=1e-6, atol=0)

    # Gradients with respect to hidden states and head agree too (the recomputed backward).
    w = jnp.asarray(np.random.default_rng(1).normal(size=want_logp.shape), jnp.float32)

    def chunked(h, hd):
        lp, _ = token_logprobs(
            h[:, :-1], hd, tokens[:, 1:], temperature=0.7, chunk_size=chunk, recompute=recompute
        )
        return jnp.sum(w * lp)

    def naive(h, hd):
        p = dict(params, lm_head=hd)  # qwen2 tiny has an untied head
        return jnp.sum(w * _naive(p, h, tokens, 0.7)[0])

    g = jax.grad(chunked, argnums=(0, 1))(hidden, head)
    g_ref = jax.grad(naive, argnums=(0, 1))(hidden, head)
    # Head gradients reach ~8 and are summed over tokens in a different order: float32 relative terms.
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)


def test_the_softmax_is_kept_up_to_the_limit() -> None:
    limit_tokens = KEEP_SOFTMAX_BYTES // (4 * 1000)
    assert keeps_softmax(limit_tokens, 1000, None) and not keeps_softmax(limit_tokens + 1, 1000, None)
    assert keeps_softmax(10**9, 1000, False) and not keeps_softmax(1, 1000, True)


def test_sequence_logprobs_aligned_with_tokens(tiny) -> None:
    _, params, tokens, hidden = tiny
    want, _ = _naive(params, hidden, tokens, 1.0)
    logp, ent = sequence_logprobs(
        hidden, transformer.lm_head(params), tokens, completion_start=4, chunk_size=4
    )
    assert logp.shape == tokens.shape
    np.testing.assert_array_equal(np.asarray(logp[:, :4]), 0.0)
    np.testing.assert_allclose(np.asarray(logp[:, 4:]), np.asarray(want[:, 3:]), atol=1e-6, rtol=0)
    assert np.isfinite(np.asarray(ent)).all()
