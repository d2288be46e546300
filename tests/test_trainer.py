"""Trainer: gradient accumulation, PPO behaviour on a tiny model, KL pull-back, exact resume, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllmjax import models
from mllmjax.errors import BadInputError
from mllmjax.loss import LossConfig
from mllmjax.models import transformer
from mllmjax.optim import OptimConfig
from mllmjax.trainer import Batch, TrainConfig, Trainer, TrainState, unrolls_layers

B, T, P = 8, 14, 5
CFG = models.tiny()


def _batch(seed: int = 0, advantages=None, **kw) -> Batch:
    """Left-padded prompts of 3..5 tokens from column P - len, completions of varying length after P."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    valid = np.zeros((B, T), bool)
    completion = np.zeros((B, T), bool)
    positions = np.full((B, T), -1, np.int32)
    for b in range(B):
        plen = 3 + b % 3
        clen = [9, 1, 4, 7, 9, 2, 6, 8][b]  # includes a one-token completion
        valid[b, P - plen : P + clen] = True
        completion[b, P : P + clen] = True
        positions[b, P - plen : P + clen] = np.arange(plen + clen)
    tokens[~valid] = 0
    if advantages is None:
        advantages = rng.normal(size=B)
    return Batch(
        tokens=jnp.asarray(tokens),
        positions=jnp.asarray(positions),
        valid=jnp.asarray(valid),
        completion=jnp.asarray(completion),
        advantages=jnp.asarray(advantages, jnp.float32),
        completion_start=P,
        **kw,
    )


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(CFG, jax.random.PRNGKey(0))


def _row_means(logp, batch: Batch) -> np.ndarray:
    m = np.asarray(batch.completion, np.float64)
    return (np.asarray(logp, np.float64) * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "dr_grpo"])
def test_grad_accumulation_1x8_equals_4x2(params, aggregation: str) -> None:
    trainer = Trainer(
        CFG,
        TrainConfig(loss=LossConfig(aggregation=aggregation, beta=0.1), logit_chunk=16),
        ref_params=params,
    )
    rng = np.random.default_rng(1)
    comp = np.asarray(_batch().completion)
    # The tiny random model gives log-probs near log(1/256) = -5.55; old and reference log-probs spread
    # around that make ratios leave [0.8, 1.3] and the KL > 0.
    old = jnp.asarray(np.where(comp, -5.55 + rng.normal(0, 0.4, comp.shape), 0.0), jnp.float32)
    ref = jnp.asarray(np.where(comp, -5.55 + rng.normal(0, 0.4, comp.shape), 0.0), jnp.float32)
    batch = _batch(old_logps=old, ref_logps=ref)
    g1, m1, l1 = trainer.grads(params, batch, micro_batch=None)
    g4, m4, l4 = trainer.grads(params, batch, micro_batch=2)
    assert float(m1["clip_low"]) > 0 and float(m1["clip_high"]) > 0 and float(m1["kl"]) > 0
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
    for key in m1:
        np.testing.assert_allclose(float(m1[key]), float(m4[key]), atol=1e-6, rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l4), atol=1e-6, rtol=0)
    if aggregation == "token":
        # One micro-batch's gradient alone is not the minibatch's.
        g_last, _, _ = trainer.grads(params, batch.rows(jnp.arange(6, 8)), micro_batch=None)
        assert not np.allclose(np.asarray(g_last["embed"]), np.asarray(g1["embed"]), atol=1e-6)


def test_one_epoch_moves_logprobs_with_the_advantage(params) -> None:
    adv = np.array([1.0, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    batch = _batch(3, advantages=adv)
    cfg = TrainConfig(
        loss=LossConfig(beta=0.0),
        optim=OptimConfig(name="adamw", peak_lr=3e-4, total_updates=2, weight_decay=0.0),
        ppo_epochs=1,
        minibatches=2,
        micro_batch=2,
    )
    trainer = Trainer(CFG, cfg, ref_params=params)
    assert trainer.ref_params is None  # beta 0 keeps no reference
    before = _row_means(trainer.logprobs(params, batch), batch)
    state, history = trainer.train_on_batch(trainer.init_state(params, jax.random.PRNGKey(0)), batch)
    after = _row_means(trainer.logprobs(state.params, batch), batch)
    assert len(history) == 2 and int(state.step) == 2
    assert all(h["ratio_min"] == h["ratio_max"] == 1.0 for h in history)  # epoch 0: ratio 1
    assert all(np.isfinite(v) for h in history for v in h.values())
    assert history[0]["lr"] > 0
    delta = after - before
    assert np.all(delta[adv > 0] > 0), delta
    assert np.all(delta[adv < 0] < 0), delta


def test_kl_is_positive_and_pulls_back_to_the_reference(params) -> None:
    noise = jax.tree.map(
        lambda p, k: 0.02 * jax.random.normal(k, p.shape),
        params,
        jax.tree.unflatten(
            jax.tree.structure(params), jax.random.split(jax.random.PRNGKey(5), len(jax.tree.leaves(params)))
        ),
    )
    moved = jax.tree.map(lambda p, n: p + n, params, noise)
    batch = _batch(4, advantages=np.zeros(B))  # no policy gradient: only the KL term acts
    cfg = TrainConfig(
        loss=LossConfig(beta=1.0, kl_estimator="k3"),
        optim=OptimConfig(name="adamw", peak_lr=1e-3, total_updates=4, weight_decay=0.0),
        ppo_epochs=2,
    )
    trainer = Trainer(CFG, cfg, ref_params=params)
    state, history = trainer.train_on_batch(trainer.init_state(moved, jax.random.PRNGKey(0)), batch)
    assert history[0]["kl"] > 0 and history[0]["policy_loss"] == 0.0
    assert history[0]["loss"] == pytest.approx(history[0]["kl"], rel=1e-6)
    assert history[-1]["kl"] < history[0]["kl"]
    # Measured afresh after the last update: the k3 KL to the reference went down.
    comp = np.asarray(batch.completion)
    ref = np.asarray(trainer.logprobs(params, batch))

    def k3(p):
        log_r = ref - np.asarray(trainer.logprobs(p, batch))
        return float(((np.exp(log_r) - 1 - log_r) * comp).sum() / comp.sum())

    assert k3(moved) == pytest.approx(history[0]["kl"], rel=1e-5)
    assert k3(state.params) < 0.9 * k3(moved)
    with pytest.raises(BadInputError, match="reference"):
        Trainer(CFG, cfg)


def _to_numpy(state: TrainState):
    return jax.tree.map(np.asarray, state)


def test_resume_is_bitwise(params) -> None:
    cfg = TrainConfig(
        loss=LossConfig(beta=0.04),
        optim=OptimConfig(name="lion", peak_lr=1e-4, total_updates=4),
        ppo_epochs=2,
        minibatches=1,
        micro_batch=4,
    )
    trainer = Trainer(CFG, cfg, ref_params=params)
    first, second = _batch(10), _batch(11)
    straight = trainer.init_state(params, jax.random.PRNGKey(7))
    straight, _ = trainer.train_on_batch(straight, first)
    saved = _to_numpy(straight)
    straight, _ = trainer.train_on_batch(straight, second)

    resumed = jax.tree.map(jnp.asarray, saved)
    resumed, _ = trainer.train_on_batch(resumed, second)
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(_to_numpy(straight)), jax.tree.leaves(_to_numpy(resumed)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.asarray(straight.params["embed"]), np.asarray(params["embed"]))


def test_bad_batches_are_rejected(params) -> None:
    trainer = Trainer(CFG, TrainConfig(loss=LossConfig(beta=0.0), minibatches=3))
    state = trainer.init_state(params, jax.random.PRNGKey(0))
    with pytest.raises(BadInputError, match="minibatches"):
        trainer.train_on_batch(state, _batch())
    trainer = Trainer(CFG, TrainConfig(loss=LossConfig(beta=0.0)))
    good = _batch()
    with pytest.raises(BadInputError, match="no completion tokens"):
        trainer.train_on_batch(state, good.replace(completion=jnp.zeros_like(good.completion)))
    with pytest.raises(BadInputError, match="NaN"):
        trainer.train_on_batch(state, good.replace(advantages=good.advantages.at[2].set(jnp.nan)))
    with pytest.raises(BadInputError, match="completion_start"):
        trainer.train_on_batch(state, good.replace(completion_start=P + 2))
    with pytest.raises(BadInputError, match="'fastest'"):
        TrainConfig(remat="fastest")
    with pytest.raises(BadInputError, match="'sideways'"):
        TrainConfig(layer_loop="sideways")


def test_remat_policies_give_the_same_gradient(params) -> None:
    batch = _batch(2)
    base = Trainer(CFG, TrainConfig(loss=LossConfig(beta=0.0)))
    g0, _, _ = base.grads(params, batch)
    g1, _, _ = Trainer(CFG, TrainConfig(loss=LossConfig(beta=0.0), remat="nothing_saveable")).grads(
        params, batch
    )
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)


def test_unrolled_layers_give_the_scanned_gradient(params) -> None:
    """layer_loop unroll (auto's choice on a CPU) differentiates per-layer trees split before the grad;
    its gradient, stacked back, and its log-probs are the scan's, and it really has no layer loop."""
    batch = _batch(4)
    scan = Trainer(CFG, TrainConfig(loss=LossConfig(beta=0.0), layer_loop="scan"))
    unroll = Trainer(CFG, TrainConfig(loss=LossConfig(beta=0.0), layer_loop="unroll"))
    (g0, m0, lp0), (g1, m1, lp1) = scan.grads(params, batch), unroll.grads(params, batch)
    assert jax.tree.structure(g0) == jax.tree.structure(g1) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lp0), np.asarray(lp1), atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(float(m0["loss"]), float(m1["loss"]), atol=1e-6, rtol=1e-6)
    loops = [t._logprobs_jit.lower(params, batch).as_text().count("stablehlo.while") for t in (scan, unroll)]
    assert loops[0] == loops[1] + 1, loops  # the layer scan (the others loop over LM-head chunks)
    # auto: unrolled on a CPU without remat; scanned under remat (memory) and on accelerators.
    assert unrolls_layers("auto", "none", "cpu") and not unrolls_layers("auto", "none", "gpu")
    assert not unrolls_layers("auto", "nothing_saveable", "cpu") and unrolls_layers("unroll", "dots_saveable")


def test_bfloat16_compute_keeps_float32_master_weights(params) -> None:
    """--compute-dtype bfloat16 on float32 params: the matmuls run in bfloat16, the parameters,
    gradients and optimizer state stay float32, and the log-probs agree with float32 compute to
    bfloat16 precision."""
    batch = _batch(3)
    f32 = Trainer(CFG, TrainConfig(loss=LossConfig(beta=0.0)))
    bf16 = Trainer(CFG, TrainConfig(loss=LossConfig(beta=0.0), compute_dtype="bfloat16"))
    lp32, lp16 = np.asarray(f32.logprobs(params, batch)), np.asarray(bf16.logprobs(params, batch))
    mask = np.asarray(batch.completion)
    diff = np.abs(lp32 - lp16)[mask]
    assert 0 < diff.max() < 0.1, diff.max()  # really computed in bfloat16, and close
    hlo = bf16._logprobs_jit.lower(params, batch).as_text()
    assert "bf16" in hlo and "dot_general" in hlo
    state = bf16.init_state(params, jax.random.PRNGKey(1))
    state, metrics, _ = bf16.update(state, batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_sharded_training_matches_single_device(params) -> None:
    """8 fake CPU devices (data=2, fsdp=4) == one device after 3 updates, to 1e-5."""
    from mllmjax.sharding import make_mesh, place_rows, shard_params

    assert jax.device_count() == 8  # tests/conftest.py asks XLA for 8 host devices
    cfg = TrainConfig(
        loss=LossConfig(beta=0.04),
        optim=OptimConfig(name="adamw", peak_lr=1e-3, total_updates=3, weight_decay=0.0),
        ppo_epochs=3,
        micro_batch=2,
    )
    batch = _batch(12)
    single = Trainer(CFG, cfg, ref_params=params)
    one, hist_one = single.train_on_batch(single.init_state(params, jax.random.PRNGKey(3)), batch)

    mesh = make_mesh("data=2,fsdp=4,tensor=1")
    sharded_params = shard_params(params, CFG, mesh)
    assert len(sharded_params["layers"]["gate"].sharding.device_set) == 8
    placed = place_rows(batch, mesh)
    multi = Trainer(CFG, cfg, ref_params=sharded_params)
    many, hist_many = multi.train_on_batch(multi.init_state(sharded_params, jax.random.PRNGKey(3)), placed)

    for new, old in zip(jax.tree.leaves(many.params), jax.tree.leaves(sharded_params), strict=True):
        assert new.sharding.is_equivalent_to(old.sharding, old.ndim)  # updates keep the placement
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    for h1, h8 in zip(hist_one, hist_many, strict=True):
        for key in ("loss", "kl", "entropy", "grad_norm", "ratio_mean"):
            np.testing.assert_allclose(h1[key], h8[key], atol=1e-5, rtol=1e-5, err_msg=key)


def test_donated_update_reuses_the_old_state_and_equals_the_plain_one(params) -> None:
    batch = _batch(4)
    cfg = TrainConfig(
        loss=LossConfig(beta=0.0), optim=OptimConfig(name="adamw", peak_lr=1e-3, total_updates=4)
    )
    plain, donating = Trainer(CFG, cfg), Trainer(CFG, cfg, donate=True)
    copy = jax.tree.map(jnp.copy, params)
    s0 = plain.init_state(params, jax.random.PRNGKey(1))
    d0 = donating.init_state(copy, jax.random.PRNGKey(1))
    s1, _, _ = plain.update(s0, batch)
    d1, _, _ = donating.update(d0, batch)
    assert not any(x.is_deleted() for x in jax.tree.leaves(s0.params))
    assert all(x.is_deleted() for x in jax.tree.leaves(d0.params))  # its buffers now hold d1
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(d1), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("spec", ["data=1,fsdp=1,tensor=1", "data=2,fsdp=4,tensor=1"])
def test_updates_of_one_shape_compile_one_program_from_the_first_state_on(params, spec) -> None:
    """A fresh state (its update count and RNG on no mesh, the parameters' specs with trailing Nones)
    and the states the updates return are placed alike, so the second update does not compile again."""
    from mllmjax.sharding import make_mesh, place_rows, shard_params

    devices = jax.devices()[: 1 if spec.startswith("data=1") else 8]
    mesh = make_mesh(spec, devices=devices)
    placed = shard_params(params, CFG, mesh)
    assert any(None in tuple(x.sharding.spec)[-1:] for x in jax.tree.leaves(placed))
    cfg = TrainConfig(
        loss=LossConfig(beta=0.0), optim=OptimConfig(name="adamw", peak_lr=1e-3, total_updates=3)
    )
    batch = place_rows(_batch(4), mesh)
    for told in (mesh, None):  # the mesh given, or the one the parameters are on
        trainer = Trainer(CFG, cfg, mesh=told, donate=True)
        state = trainer.init_state(jax.tree.map(jnp.copy, placed), jax.random.PRNGKey(1))
        for _ in range(3):
            state, _, _ = trainer.update(state, batch)
        assert [fn._cache_size() for fn in trainer._update_jits.values()] == [1]


def test_updates_on_no_mesh_compile_one_program_from_a_loaded_state_on(params) -> None:
    """Params committed to a device (as a loaded checkpoint's are) beside a fresh update count and RNG
    made on no device: the updates return every leaf committed, so the first state is committed alike
    and the second update does not compile again."""
    cfg = TrainConfig(
        loss=LossConfig(beta=0.0), optim=OptimConfig(name="adamw", peak_lr=1e-3, total_updates=3)
    )
    trainer = Trainer(CFG, cfg, donate=True)
    loaded = jax.tree.map(lambda x: jax.device_put(jnp.copy(x), jax.devices()[0]), params)
    state = trainer.init_state(loaded, jax.random.PRNGKey(1))
    assert not all(x.committed for x in jax.tree.leaves(state))
    batch = _batch(4)
    for _ in range(3):
        state, _, _ = trainer.update(state, batch)
    assert [fn._cache_size() for fn in trainer._update_jits.values()] == [1]
