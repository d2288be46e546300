"""Sampling strategies: how the next token is drawn from a row of logits.

Design decisions:
- A strategy is a small frozen dataclass with one method, `next_tokens(logits, rng) -> (tokens,
  logprobs)`, so the decode loop is written once and a user can plug in their own (gemma's
  `_sampling.py` shape).
- The filters compose in the order transformers applies its logits warpers: temperature, then top-k,
  then top-p (nucleus), then min-p. Each filter sees the distribution the previous one left
  (renormalised), which is what HF does by setting removed logits to -inf before the next warper.
- The log-prob returned for each sampled token is log softmax(logits / temperature) over the FULL
  vocabulary in float32, not the truncated distribution the token was drawn from: it is the policy
  probability the GRPO trainer recomputes (logits divided by the sampling temperature), so the first
  PPO epoch has ratio exactly 1. Greedy reports temperature-1 log-probs.
- Everything is a pure jnp function of (logits, rng): seeded runs are reproducible, and the same
  strategy runs inside the compiled decode loop.
- The command-line vocabulary (temperature 0 or --greedy = Greedy; top-k 0, top-p 1, min-p 0 = off)
  becomes a strategy in one place, `make_strategy`; `Sample` validates its values once, on creation.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from mllmjax.errors import BadInputError
from mllmjax.settings import DEFAULTS

_NEG_INF = -jnp.inf


class Strategy(Protocol):
    def next_tokens(self, logits: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """logits: [B, V] float; returns (tokens [B] int32, log-probs [B] float32)."""
        ...


def _token_logprobs(scaled: jax.Array, tokens: jax.Array, top: jax.Array | None = None) -> jax.Array:
    """log softmax(scaled)[tokens] per row, without writing the [B, V] log-softmax out (what
    `jax.nn.log_softmax` computes, gathered first). top: the rows' max, if the caller has it."""
    top = jnp.max(scaled, axis=-1, keepdims=True) if top is None else top
    log_sum = jnp.log(jnp.sum(jnp.exp(scaled - top), axis=-1))
    return (jnp.take_along_axis(scaled, tokens[:, None], axis=-1) - top)[:, 0] - log_sum


@dataclasses.dataclass(frozen=True, kw_only=True)
class Greedy:
    """The most probable token (ties: the lowest id, as torch.argmax); log-probs at temperature 1."""

    def next_tokens(self, logits: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = logits.astype(jnp.float32)
        # The lowest id holding the row's max: two plain reductions. jnp.argmax is one reduction over
        # (value, index) pairs, which XLA:CPU runs several times slower.
        top = jnp.max(logits, axis=-1, keepdims=True)
        ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        tokens = jnp.min(jnp.where(logits == top, ids, logits.shape[-1] - 1), axis=-1)
        return tokens, _token_logprobs(logits, tokens, top)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits per row, -inf the rest.

    Exactly k survive: a tie at the k-th value goes to the lower id (lax.top_k's order), where HF
    keeps every tied token. Exact float ties at that boundary do not occur with real logits, and a
    fixed k lets sampling run over the k candidates instead of the whole vocabulary.
    """
    if k >= logits.shape[-1]:
        return logits
    _, idx = jax.lax.top_k(logits, k)
    keep = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], idx].set(True)
    return jnp.where(keep, logits, _NEG_INF)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest most-probable set whose mass reaches p (at least one token)."""
    order = jnp.argsort(-logits, axis=-1)  # stable: equal logits keep id order
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly better-ranked tokens
    keep_sorted = mass_before < p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, _NEG_INF)


def min_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Keep tokens whose probability is at least p times the most probable one's."""
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs >= threshold, logits, _NEG_INF)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sample:
    """Ancestral sampling from softmax(logits / temperature), optionally truncated.

    Filters apply in transformers' order: temperature, top-k, top-p, min-p. None (or top_k 0,
    top_p 1, min_p 0) switches a filter off. Temperature 1 with no filter is plain sampling.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature == 0:
            raise BadInputError("Sample needs a temperature > 0; temperature 0 is Greedy()")
        if not 0 < self.temperature < float("inf"):
            raise BadInputError(f"--temperature must be finite and >= 0 (0 = greedy), got {self.temperature!r}")
        check_filters(self.top_k, self.top_p, self.min_p)

    def filtered_logits(self, logits: jax.Array) -> jax.Array:
        """The temperature-scaled logits with removed tokens at -inf: the distribution drawn from."""
        x = logits.astype(jnp.float32) / self.temperature
        if self.top_k:
            x = top_k_filter(x, self.top_k)
        if self.top_p is not None and self.top_p < 1:
            x = top_p_filter(x, self.top_p)
        if self.min_p:
            x = min_p_filter(x, self.min_p)
        return x

    def next_tokens(self, logits: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        scaled = logits.astype(jnp.float32) / self.temperature
        if self.top_k and self.top_k < logits.shape[-1]:
            # Draw among the k candidates only: the same distribution as filtered_logits, but k
            # Gumbel draws per row instead of one per vocabulary entry (on a CPU, a draw over the full
            # vocabulary costs about as much as the model's decode step).
            vals, idx = jax.lax.top_k(scaled, self.top_k)  # [B, k], descending
            if self.top_p is not None and self.top_p < 1:
                vals = top_p_filter(vals, self.top_p)
            if self.min_p:
                vals = min_p_filter(vals, self.min_p)
            choice = jax.random.categorical(rng, vals, axis=-1)
            tokens = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        else:
            tokens = jax.random.categorical(rng, self.filtered_logits(logits), axis=-1).astype(jnp.int32)
        return tokens, _token_logprobs(scaled, tokens)


def check_filters(top_k: int | None, top_p: float | None, min_p: float | None) -> None:
    """Range checks of the truncation filters (None: off), also for greedy runs, which ignore them."""
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise BadInputError(f"top_k must be a non-negative integer (0 = off), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise BadInputError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and not 0 <= min_p < 1:
        raise BadInputError(f"min_p must be in [0, 1), got {min_p!r}")


def make_strategy(
    *,
    temperature: float = DEFAULTS.temperature,
    top_k: int | None = DEFAULTS.top_k,
    top_p: float | None = DEFAULTS.top_p,
    min_p: float | None = DEFAULTS.min_p,
    greedy: bool = False,
) -> Greedy | Sample:
    """The strategy the sampling flags (sample, rollout, eval, grpo) describe: temperature 0 or `greedy`
    is Greedy; top_k 0, top_p 1 and min_p 0 (or None) switch that filter off. Defaults: the flags'.
    Out-of-range values are refused whether or not the run samples."""
    check_filters(top_k, top_p, min_p)
    if not 0 <= temperature < float("inf"):
        raise BadInputError(f"--temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")
    if greedy or temperature == 0:
        return Greedy()
    return Sample(
        temperature=temperature,
        top_k=top_k or None,
        top_p=None if top_p == 1 else top_p,
        min_p=min_p or None,
    )
