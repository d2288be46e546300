"""Learning-rate schedule (counted in optimizer updates), the optimizers' first update by hand, and several
updates of each optimizer against a numpy re-implementation of its paper's update rule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


# --------------------------------------------------- several updates against a numpy re-implementation
# The update rules as the papers write them (Lion: Chen et al. 2023, Algorithm 2 with decoupled weight
# decay; AdamW: Loshchilov & Hutter 2019, Algorithm 2 with the learning rate scaling the decay, as optax
# and PyTorch do), after global-norm clipping, on the warm-up + cosine schedule as its docstring states
# it. Weight decay 0.1 and LR 1e-2 make the decay term visible next to the step. Neither README nor
# docs/design.md exempts any parameter from decay, and optim.py passes no mask: every parameter decays,
# norm scales and biases included.
PEAK, TOTAL, WARMUP_FRAC, WD, CLIP = 1e-2, 5, 0.4, 0.1, 1.0


def _model_like_tree(rng) -> dict:
    return {
        "embed": rng.normal(size=(6, 4)),
        "layers": {
            "q": rng.normal(size=(4, 4)),
            "q_bias": rng.normal(size=4),
            "norm": 1 + 0.1 * rng.normal(size=4),
        },
    }


def _np_lr(u: int) -> float:
    """LR of update u (1-based): linear warm-up over W updates, cosine to 0 at update TOTAL + 1, 0 after."""
    w = max(1, round(WARMUP_FRAC * TOTAL))
    if u > TOTAL:
        return 0.0
    if u <= w:
        return PEAK * u / w
    return PEAK * 0.5 * (1 + math.cos(math.pi * (u - w) / (TOTAL - w + 1)))


def _np_clip(grads: list[np.ndarray]) -> list[np.ndarray]:
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads))
    return [g * (CLIP / norm) for g in grads] if norm > CLIP else grads


def _np_lion(params, grads_per_update, b1=0.9, b2=0.99):
    m = [np.zeros_like(p) for p in params]
    out = []
    for u, grads in enumerate(grads_per_update, start=1):
        lr, grads = _np_lr(u), _np_clip(grads)
        new_p, new_m = [], []
        for p, g, mu in zip(params, grads, m, strict=True):
            c = b1 * mu + (1 - b1) * g  # the direction interpolates with b1 ...
            new_p.append(p - lr * (np.sign(c) + WD * p))
            new_m.append(b2 * mu + (1 - b2) * g)  # ... and the momentum is tracked with b2
        params, m = new_p, new_m
        out.append(params)
    return out


def _np_adamw(params, grads_per_update, b1=0.9, b2=0.999, eps=1e-8):
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    out = []
    for u, grads in enumerate(grads_per_update, start=1):
        lr, grads = _np_lr(u), _np_clip(grads)
        m = [b1 * mu + (1 - b1) * g for mu, g in zip(m, grads, strict=True)]
        v = [b2 * nu + (1 - b2) * g * g for nu, g in zip(v, grads, strict=True)]
        params = [
            p - lr * ((mu / (1 - b1**u)) / (np.sqrt(nu / (1 - b2**u)) + eps) + WD * p)
            for p, mu, nu in zip(params, m, v, strict=True)
        ]
        out.append(params)
    return out


@pytest.mark.parametrize("name,reference", [("lion", _np_lion), ("adamw", _np_adamw)])
def test_updates_match_numpy_reference(name, reference) -> None:
    """Six updates of a five-update run: warm-up, cosine decay, clipped (x5) and unclipped (x0.05)
    gradients that change every update, decoupled weight decay on every parameter; the sixth update,
    past the schedule's end, has LR 0 and changes nothing."""
    rng = np.random.default_rng(1)
    params0 = _model_like_tree(rng)
    scales = [5.0, 0.05, 3.0, 0.05, 5.0, 2.0]
    grads_np = [jax.tree.map(lambda p, s=s: s * rng.normal(size=p.shape), params0) for s in scales]
    leaves0, treedef = jax.tree.flatten(params0)
    want = reference(leaves0, [jax.tree.leaves(g) for g in grads_np])
    assert [_np_lr(u) for u in (1, 2, 6)] == [PEAK / 2, PEAK, 0.0]

    cfg = OptimConfig(name=name, peak_lr=PEAK, warmup_frac=WARMUP_FRAC, weight_decay=WD, total_updates=TOTAL)
    assert cfg.clip_norm == CLIP
    opt = make_optimizer(cfg)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params0)
    state = opt.init(params)
    update = jax.jit(opt.update)
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params0)[0]]
    for u, (grads, want_leaves) in enumerate(zip(grads_np, want, strict=True), start=1):
        grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert jax.tree.structure(params) == treedef
        for got, ref, where in zip(jax.tree.leaves(params), want_leaves, names, strict=True):
            np.testing.assert_allclose(
                np.asarray(got), ref, rtol=1e-5, atol=1e-6, err_msg=f"update {u}, {where}"
            )
    for leaf in jax.tree.leaves(updates):  # the update past the schedule's end
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
