"""Learning-rate schedule (counted in optimizer updates) and the optimizers' first update by hand."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllmjax.errors import BadInputError
from mllmjax.optim import OptimConfig, make_optimizer, total_updates, warmup_cosine


def _lrs(schedule, n: int) -> np.ndarray:
    return np.array([float(schedule(i)) for i in range(n)])


def test_total_counts_every_update() -> None:
    assert total_updates(400, 2, 1) == 800
    assert total_updates(10, 2, 4) == 80
    with pytest.raises(BadInputError, match="0"):
        total_updates(10, 0, 1)


def test_first_update_has_positive_lr_and_warmup_reaches_peak() -> None:
    peak, total = 1e-6, 800  # 400 steps x 2 PPO epochs
    lrs = _lrs(warmup_cosine(peak, total), total + 2)
    warmup = 40  # 5% of 800
    assert lrs[0] == pytest.approx(peak / warmup, rel=1e-6)  # not 0: the first update already moves
    np.testing.assert_allclose(lrs[:warmup], peak * np.arange(1, warmup + 1) / warmup, rtol=1e-6)
    assert lrs[warmup - 1] == pytest.approx(peak, rel=1e-6)
    assert lrs.argmax() == warmup - 1


def test_lr_does_not_reach_zero_halfway() -> None:
    """FIX: counting updates, not steps, the LR at the middle of the run is about half the peak."""
    peak, steps, epochs = 1e-6, 400, 2
    total = total_updates(steps, epochs, 1)
    lrs = _lrs(warmup_cosine(peak, total), total + 1)
    warmup = 40
    u = steps  # the update made at step 200 of 400, the run's middle
    want = peak * 0.5 * (1 + math.cos(math.pi * (u - warmup) / (total - warmup + 1)))
    assert lrs[u - 1] == pytest.approx(want, rel=1e-5)
    assert lrs[u - 1] > 0.4 * peak
    # Strictly decreasing after warm-up, positive through the last update, 0 past the end.
    assert np.all(np.diff(lrs[warmup - 1 : total]) < 0)
    assert lrs[total - 1] > 0
    assert lrs[total] == 0.0


def test_single_update_run_uses_peak() -> None:
    assert float(warmup_cosine(3e-4, 1)(0)) == pytest.approx(3e-4, rel=1e-6)


def _tree():
    rng = np.random.default_rng(0)
    params = {
        "a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=5), jnp.float32),
    }
    grads = {
        "a": jnp.asarray(rng.normal(size=(3, 4)) * 5, jnp.float32),
        "b": jnp.asarray(rng.normal(size=5) * 5, jnp.float32),
    }
    return params, grads


def test_lion_first_update_by_hand() -> None:
    cfg = OptimConfig(name="lion", peak_lr=1e-3, total_updates=10)
    opt = make_optimizer(cfg)
    params, grads = _tree()
    updates, _ = opt.update(grads, opt.init(params), params)
    lr = 1e-3 / 1  # warm-up of max(1, round(0.5)) = 1 update: the peak
    for k in params:
        p, g = np.asarray(params[k], np.float64), np.asarray(grads[k], np.float64)
        # Lion's first direction is sign((1 - b1) * g) = sign(g); decoupled weight decay 1e-8.
        want = -lr * (np.sign(g) + 1e-8 * p)
        np.testing.assert_allclose(np.asarray(updates[k]), want, rtol=1e-6)


def test_adamw_clips_global_norm_first() -> None:
    cfg = OptimConfig(name="adamw", peak_lr=1e-3, total_updates=10, weight_decay=0.0)
    opt = make_optimizer(cfg)
    params, grads = _tree()
    _, state = opt.update(grads, opt.init(params), params)
    norm = math.sqrt(sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
    assert norm > 1.0
    adam_state = state[1][0]  # chain(clip, adamw(scale_by_adam, ...))
    for k in params:
        # The first moment after one update is (1 - b1) * the clipped gradient.
        np.testing.assert_allclose(np.asarray(adam_state.mu[k]), 0.1 * np.asarray(grads[k]) / norm, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "sgd"}, "'sgd'"),
        ({"peak_lr": 0.0}, "0.0"),
        ({"warmup_frac": 1.5}, "1.5"),
        ({"clip_norm": -1.0}, "-1.0"),
    ],
)
def test_config_rejects_bad_values(kwargs, match) -> None:
    with pytest.raises(BadInputError, match=match):
        OptimConfig(**kwargs)
