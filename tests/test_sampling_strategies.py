"""Sampling strategies draw from exactly the distribution they claim (histograms against hand-computed
probabilities) and report full-vocabulary temperature-scaled log-probs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllmjax.errors import BadInputError
from mllmjax.sampling import Greedy, Sample, make_strategy

LOGITS = np.array([2.0, 1.5, 1.1, 0.3, -0.4, -1.0, -2.5, 0.9], np.float32)
DRAWS = 40_000
# Each category's count is Binomial(DRAWS, p): within 5 standard deviations with probability
# 1 - 5.7e-7, so a correct sampler fails the 8-category check with probability < 5e-6 (Bonferroni),
# while a distribution off by 1 point of probability on any token is ~10 sd away.
Z = 5.0


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    e[~np.isfinite(x)] = 0.0
    return e / e.sum()


def _expected(temperature: float, top_k=None, top_p=None, min_p=None) -> np.ndarray:
    """The target distribution, computed step by step as transformers' warpers do."""
    x = LOGITS.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p is not None:
        p = _softmax(x)
        order = np.argsort(-x, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep = np.zeros(len(x), bool)
        keep[order] = before < top_p
        keep[order[0]] = True
        x = np.where(keep, x, -np.inf)
    if min_p is not None:
        p = _softmax(x)
        x = np.where(p >= min_p * p.max(), x, -np.inf)
    return _softmax(x)


def _histogram(strategy, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, len(LOGITS)))
    tokens, logprobs = jax.jit(strategy.next_tokens)(logits, jax.random.key(seed))
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    return np.bincount(tokens, minlength=len(LOGITS)), tokens, logprobs


CASES = {
    "temperature-1": dict(temperature=1.0),
    "temperature-0.6": dict(temperature=0.6),
    "temperature-1.7": dict(temperature=1.7),
    "top-k-3": dict(temperature=1.0, top_k=3),
    "top-p-0.7": dict(temperature=1.0, top_p=0.7),
    "min-p-0.3": dict(temperature=1.0, min_p=0.3),
    "temp-top-k-top-p": dict(temperature=0.8, top_k=5, top_p=0.8),
    "temp-top-k-min-p": dict(temperature=1.3, top_k=6, min_p=0.2),
    "all": dict(temperature=1.2, top_k=6, top_p=0.9, min_p=0.15),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sampling_histogram_matches_expected(name):
    kw = CASES[name]
    want = _expected(**kw)
    counts, tokens, logprobs = _histogram(Sample(**kw))
    assert counts[want == 0].sum() == 0, f"drew tokens the filters remove: {counts} vs {want}"
    sd = np.sqrt(DRAWS * want * (1 - want))
    support = want > 0
    dev = np.abs(counts - DRAWS * want)[support] / np.maximum(sd[support], 1e-12)
    assert dev.max() < Z, f"counts {counts} vs expected {np.round(DRAWS * want)}"
    # Log-probs: the full-vocabulary softmax of logits / temperature, not the truncated distribution.
    full = np.log(_softmax(LOGITS.astype(np.float64) / kw["temperature"]))
    np.testing.assert_allclose(logprobs, full[tokens], atol=1e-5, rtol=0)


def test_filters_actually_truncate():
    # Guard against the expected-distribution helper silently keeping everything.
    assert (_expected(1.0, top_k=3) > 0).sum() == 3
    assert 1 < (_expected(1.0, top_p=0.7) > 0).sum() < len(LOGITS)
    assert 1 < (_expected(1.0, min_p=0.3) > 0).sum() < len(LOGITS)


def test_seeded_and_reproducible():
    s = Sample(temperature=1.0, top_k=4)
    a = _histogram(s, seed=3)[1]
    b = _histogram(s, seed=3)[1]
    c = _histogram(s, seed=4)[1]
    assert (a == b).all() and not (a == c).all()


def test_greedy_and_make_strategy():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
    tokens, logprobs = Greedy().next_tokens(logits, jax.random.key(0))
    assert tokens.tolist() == [0, len(LOGITS) - 1]
    np.testing.assert_allclose(logprobs, np.log(_softmax(LOGITS.astype(np.float64)))[0], atol=1e-6)
    # A tie goes to the lowest id (torch.argmax's rule), whatever the order of the reduction.
    tied = jnp.asarray([[0.0, 1.0, 3.0, 0.0, 0.0, 3.0], [3.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    tokens, logprobs = Greedy().next_tokens(tied, jax.random.key(0))
    assert tokens.tolist() == [2, 0]
    want = np.log(np.exp(3.0) / np.exp(np.asarray(tied, np.float64)).sum(-1))
    np.testing.assert_allclose(logprobs, want, atol=1e-6)
    assert make_strategy(temperature=0.0) == Greedy()
    assert make_strategy(temperature=0.7, greedy=True) == Greedy()
    assert make_strategy(temperature=0.7, top_k=50) == Sample(temperature=0.7, top_k=50)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(min_p=1.0), "min_p"),
    ],
)
def test_bad_parameters_are_rejected(kw, match):
    with pytest.raises(BadInputError, match=match):
        Sample(**kw)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
    ],
)
@pytest.mark.parametrize("greedy", [False, True])
def test_flags_are_range_checked_even_when_greedy_ignores_them(kw, match, greedy):
    """`sample --greedy --top-p 1.5` (or eval, greedy by default) must refuse the flag, not drop it."""
    with pytest.raises(BadInputError, match=match):
        make_strategy(**kw, greedy=greedy)


def test_top_k_keeps_exactly_k_with_ties_to_lower_ids():
    logits = jnp.asarray([[0.5, 1.0, 1.0, 1.0, -2.0]])
    kept = np.isfinite(np.asarray(Sample(top_k=2).filtered_logits(logits)))[0]
    assert kept.tolist() == [False, True, True, False, False]
    draws = Sample(top_k=2).next_tokens(jnp.broadcast_to(logits, (2000, 5)), jax.random.key(0))[0]
    assert set(np.asarray(draws).tolist()) == {1, 2}
