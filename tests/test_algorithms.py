"""The algorithm catalogue (GSPO, CISPO, the entropy bonus, REINFORCE++, DAPO's soft overlong penalty,
the dapo/gspo recipes), each against a plain numpy reference of its formula on hand-made numbers."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllmjax import models
from mllmjax.advantages import compute_advantages
from mllmjax.errors import BadInputError
from mllmjax.grpo.config import build_config, read_config_file
from mllmjax.loss import LossConfig, aggregation_weights, grpo_loss, token_logprobs
from mllmjax.models import transformer
from mllmjax.records import RolloutRecord
from mllmjax.scoring import ScoreConfig, score_records, soft_overlong
from mllmjax.trainer import Batch, TrainConfig, Trainer

f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731


def _weights(mask: np.ndarray, aggregation: str) -> np.ndarray:
    m = mask.astype(np.float64)
    if aggregation == "token":
        return m / max(m.sum(), 1.0)
    return m / (np.maximum(m.sum(1, keepdims=True), 1.0) * m.shape[0])


def _inputs(seed: int, b: int = 6, t: int = 9):
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-4.0, -0.1, (b, t))
    old = logp + rng.normal(0.0, 0.3, (b, t))
    adv = rng.normal(size=b)
    mask = np.zeros((b, t), bool)
    for row, n in enumerate([t, 1, 0, 5, 7, 3][:b]):  # a one-token and an empty row
        mask[row, t - n :] = True
    return logp, old, adv, mask


def _loss_and_grad(logp, old, adv, mask, cfg: LossConfig, entropy=None):
    weights = aggregation_weights(jnp.asarray(mask), cfg)

    def fn(lp, ent):
        return grpo_loss(lp, f32(old), f32(adv), jnp.asarray(mask), weights, cfg, entropy=ent)

    ent = None if entropy is None else f32(entropy)
    (loss, metrics), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(f32(logp), ent)
    return float(loss), metrics, np.asarray(grads[0]), None if entropy is None else np.asarray(grads[1])


# ------------------------------------------------------------------------------------------- GSPO
def _numpy_gspo(logp, old, adv, mask, lo, hi, aggregation):
    """GSPO (arXiv 2507.18071, eq. 5-7) in float64: s_i = exp(mean_t(logp - old)); each row's loss
    -min(s A, clip(s) A), weighted by the sum of its tokens' aggregation weights; its gradient reaches
    each token as -A s / |y_i| while s is inside the clip range on the side A pushes."""
    m = mask.astype(np.float64)
    n = np.maximum(m.sum(1), 1.0)
    s = np.exp((m * (logp - old)).sum(1) / n)
    row_w = _weights(mask, aggregation).sum(1)
    row_loss = -np.minimum(s * adv, np.clip(s, 1 - lo, 1 + hi) * adv)
    active = np.where(adv >= 0, s <= 1 + hi, s >= 1 - lo)
    dlogp = (row_w * np.where(active, -adv * s, 0.0) / n)[:, None] * m
    return float((row_w * row_loss).sum()), dlogp, s


def test_gspo_hand_computed():
    # One row of two tokens: mean log-ratio (0.1 - 0.2) / 2 = -0.05, s = exp(-0.05) = 0.951229...,
    # inside [0.8, 1.3]; A = 1, sequence mean: loss -s, and each token's gradient -s / 2.
    cfg = LossConfig(ratio_level="sequence", aggregation="sequence", beta=0.0, clip_low=0.2, clip_high=0.3)
    logp, old = np.array([[-1.0, -2.0]]), np.array([[-1.1, -1.8]])
    loss, metrics, grad, _ = _loss_and_grad(logp, old, np.array([1.0]), np.ones((1, 2), bool), cfg)
    s = math.exp(-0.05)
    assert loss == pytest.approx(-s, rel=1e-6)
    np.testing.assert_allclose(grad, [[-s / 2, -s / 2]], rtol=1e-6)
    assert float(metrics["ratio_min"]) == pytest.approx(s, rel=1e-6) == float(metrics["ratio_max"])


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_gspo_matches_numpy_with_clipping_on_both_sides(aggregation):
    lo, hi = 0.05, 0.08
    cfg = LossConfig(ratio_level="sequence", aggregation=aggregation, beta=0.0, clip_low=lo, clip_high=hi)
    logp, old, adv, mask = _inputs(3)
    adv[:] = [1.0, -1.0, 0.7, -0.4, 0.9, -1.3]
    old[0] = logp[0] + 0.2  # s = exp(-0.2) < 1 - lo with A > 0: unclipped branch (min), gradient flows
    old[1] = logp[1] + 0.2  # s < 1 - lo with A < 0: clipped, no gradient
    old[3] = logp[3] - 0.15  # s > 1 + hi with A < 0: gradient flows
    old[4] = logp[4] - 0.15  # s > 1 + hi with A > 0: clipped, no gradient
    old[5] = logp[5] + 0.01  # inside the range
    want_loss, want_grad, s = _numpy_gspo(logp, old, adv, mask, lo, hi, aggregation)
    loss, metrics, grad, _ = _loss_and_grad(logp, old, adv, mask, cfg)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)
    assert not grad[1].any() and not grad[4].any() and grad[0].any() and grad[3].any()
    # The clip fractions count the tokens of the clipped rows: row 1's one token low, row 4's 7 high.
    n = mask.sum()
    assert float(metrics["clip_low"]) == pytest.approx(1 / n)
    assert float(metrics["clip_high"]) == pytest.approx(7 / n)
    on = mask.any(1)
    assert float(metrics["ratio_min"]) == pytest.approx(s[on].min(), rel=1e-6)


def test_gspo_at_ratio_one_is_the_sequence_mean_policy_gradient():
    """On-policy (old = logp) GSPO's gradient is GRPO's with sequence-mean aggregation."""
    logp, _, adv, mask = _inputs(5)
    gspo = LossConfig(ratio_level="sequence", aggregation="sequence", beta=0.0, clip_low=3e-4, clip_high=4e-4)
    grpo = LossConfig(aggregation="sequence", beta=0.0)
    _, _, g1, _ = _loss_and_grad(logp, logp, adv, mask, gspo)
    _, _, g2, _ = _loss_and_grad(logp, logp, adv, mask, grpo)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ CISPO
def test_cispo_matches_numpy_and_keeps_clipped_tokens_gradient():
    """CISPO (arXiv 2506.13585, eq. 4): J = sum_t w_t sg(clip(r_t, 1 - lo, 1 + hi)) A log pi_t, so
    d loss / d logp_t = -w_t clip(r_t) A, also where the ratio is clipped (PPO's gradient is 0 there)."""
    lo, hi = 1.0, 0.28  # MiniMax: no lower clip
    cfg = LossConfig(loss="cispo", beta=0.0, clip_low=lo, clip_high=hi)
    logp, old, adv, mask = _inputs(11)
    r = np.exp(logp - old)
    w = _weights(mask, "token")
    weight = np.clip(r, 1 - lo, 1 + hi)
    loss, metrics, grad, _ = _loss_and_grad(logp, old, adv, mask, cfg)
    assert loss == pytest.approx(float(np.sum(-w * weight * adv[:, None])), rel=1e-5)
    np.testing.assert_allclose(grad, -w * weight * adv[:, None], rtol=1e-5, atol=1e-9)
    clipped = mask & (r > 1 + hi)
    assert clipped.any() and np.all(grad[clipped & (adv[:, None] != 0)] != 0)
    assert float(metrics["clip_high"]) == pytest.approx(clipped.sum() / mask.sum())
    assert float(metrics["clip_low"]) == 0.0
    # PPO with the same clip drops the gradient of the clipped tokens its advantage pushes further.
    _, _, ppo_grad, _ = _loss_and_grad(logp, old, adv, mask, LossConfig(beta=0.0, clip_low=0.2, clip_high=hi))
    pushed = clipped & (adv[:, None] > 0)
    assert pushed.any() and not ppo_grad[pushed].any()


# ---------------------------------------------------------------------------------------- entropy
def test_entropy_bonus_is_minus_coef_times_the_aggregated_entropy_and_never_nan():
    logp, old, adv, mask = _inputs(2)
    entropy = np.random.default_rng(0).uniform(0.5, 3.0, logp.shape)
    entropy[~mask] = np.nan  # padding may hold anything: it must not reach the loss
    coef = 0.01
    cfg = LossConfig(beta=0.0, entropy_coef=coef, aggregation="sequence")
    plain, _, _, _ = _loss_and_grad(logp, old, adv, mask, LossConfig(beta=0.0, aggregation="sequence"))
    loss, metrics, grad, dent = _loss_and_grad(logp, old, adv, mask, cfg, entropy=entropy)
    w = _weights(mask, "sequence")
    bonus = -coef * float(np.sum(w[mask] * entropy[mask]))
    assert loss == pytest.approx(plain + bonus, rel=1e-5)
    assert float(metrics["entropy_loss"]) == pytest.approx(bonus, rel=1e-5)
    assert np.isfinite(grad).all() and np.isfinite(dent).all()
    np.testing.assert_allclose(dent, -coef * w, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def tiny():
    cfg = models.tiny("qwen2")
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 12)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), tokens.shape)
    hidden, _ = transformer.forward(params, cfg, tokens, pos)
    return params, tokens, hidden


@pytest.mark.parametrize("recompute,softcap", [(False, None), (True, None), (None, 3.0)])
def test_entropy_gradient_equals_autodiff_of_the_plain_entropy(tiny, recompute, softcap):
    """d/d(hidden, head) of sum(u * logp + v * entropy) written out in the chunked backward equals
    JAX's autodiff of the naive log_softmax entropy (with the logit soft-cap when given)."""
    params, tokens, hidden = tiny
    head = transformer.lm_head(params)
    rng = np.random.default_rng(1)
    u = f32(rng.normal(size=(3, 11)))
    v = f32(rng.normal(size=(3, 11)))
    temp = 0.7

    def chunked(h, hd):
        lp, ent = token_logprobs(h[:, :-1], hd, tokens[:, 1:], temperature=temp, chunk_size=5,
                                 recompute=recompute, softcap=softcap, entropy_grad=True)  # fmt: skip
        return jnp.sum(u * lp + v * ent)

    def naive(h, hd):
        raw = jnp.einsum("btd,vd->btv", h[:, :-1], hd)
        if softcap is not None:
            raw = softcap * jnp.tanh(raw / softcap)
        logp_all = jax.nn.log_softmax(raw / temp, axis=-1)
        lp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return jnp.sum(u * lp + v * ent)

    got = jax.grad(chunked, argnums=(0, 1))(hidden, head)
    want = jax.grad(naive, argnums=(0, 1))(hidden, head)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    # Without entropy_grad the entropy is a metric: its cotangent is dropped.
    plain = jax.grad(lambda h: jnp.sum(token_logprobs(h[:, :-1], head, tokens[:, 1:], temperature=temp,
                                                      chunk_size=5, recompute=recompute, softcap=softcap)[1]))(hidden)  # fmt: skip
    assert not np.asarray(plain).any()


# ------------------------------------------------------------------- the trainer with the variants
B, T, P = 8, 14, 5
TINY = models.tiny()


def _batch(seed: int = 0, advantages=None) -> Batch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (B, T)).astype(np.int32)
    valid = np.zeros((B, T), bool)
    completion = np.zeros((B, T), bool)
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        plen, clen = 3 + b % 3, [9, 1, 4, 7, 9, 2, 6, 8][b]
        valid[b, P - plen : P + clen] = True
        completion[b, P : P + clen] = True
        positions[b, P - plen : P + clen] = np.arange(plen + clen)
    tokens[~valid] = 0
    adv = rng.normal(size=B) if advantages is None else advantages
    old = np.where(completion, -5.55 + rng.normal(0, 0.4, (B, T)), 0.0)
    return Batch(tokens=jnp.asarray(tokens), positions=jnp.asarray(positions), valid=jnp.asarray(valid),
                 completion=jnp.asarray(completion), advantages=f32(adv), old_logps=f32(old),
                 completion_start=P)  # fmt: skip


@pytest.fixture(scope="module")
def params():
    return transformer.init_params(TINY, jax.random.PRNGKey(0))


@pytest.mark.parametrize(
    "loss_cfg",
    [
        LossConfig(ratio_level="sequence", aggregation="sequence", beta=0.0, clip_low=0.05, clip_high=0.05),
        LossConfig(loss="cispo", beta=0.0, clip_low=1.0, clip_high=0.1),
        LossConfig(beta=0.0, entropy_coef=0.05),
    ],
    ids=["gspo", "cispo", "entropy"],
)
def test_variants_split_into_micro_batches_exactly(params, loss_cfg):
    """Each variant's minibatch gradient and metrics are the same in one pass or in 4 micro-batches, and
    differ from the plain PPO loss's."""
    trainer = Trainer(TINY, TrainConfig(loss=loss_cfg, logit_chunk=16))
    batch = _batch()
    g1, m1, _ = trainer.grads(params, batch, micro_batch=None)
    g4, m4, _ = trainer.grads(params, batch, micro_batch=2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)
    for key in m1:
        np.testing.assert_allclose(float(m1[key]), float(m4[key]), atol=1e-6, rtol=1e-6, err_msg=key)
    plain, _, _ = Trainer(TINY, TrainConfig(loss=LossConfig(beta=0.0), logit_chunk=16)).grads(params, batch)
    assert not np.allclose(np.asarray(g1["embed"]), np.asarray(plain["embed"]), atol=1e-7)
    if loss_cfg.entropy_coef:
        assert float(m1["entropy_loss"]) == pytest.approx(-0.05 * float(m1["entropy"]), rel=1e-5)


def test_the_entropy_bonus_raises_the_entropy(params):
    """With zero advantages the bonus is the only force: updates raise the policy's entropy."""
    from mllmjax.optim import OptimConfig

    cfg = TrainConfig(loss=LossConfig(beta=0.0, entropy_coef=1.0), ppo_epochs=4, logit_chunk=16,
                      optim=OptimConfig(name="adamw", peak_lr=1e-2, warmup_frac=0.0, total_updates=4))  # fmt: skip
    trainer = Trainer(TINY, cfg)
    state = trainer.init_state(params, jax.random.key_data(jax.random.key(0)))
    _, history = trainer.train_on_batch(state, _batch(advantages=np.zeros(B)))
    ent = [h["entropy"] for h in history]
    assert ent[-1] > ent[0] and all(np.isfinite(ent))


# ------------------------------------------------------------------------------------ REINFORCE++
def test_reinforce_pp_hand_computed():
    # Centred: [[0.5, -0.5], [0, 0], [1, -1]]; their mean 0, population std sqrt((0.25*2 + 1*2) / 6).
    r = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 1.0]])
    std = math.sqrt(2.5 / 6) + 1e-4
    want = np.array([[0.5, -0.5], [0.0, 0.0], [1.0, -1.0]]) / std
    np.testing.assert_allclose(compute_advantages(r, "reinforce_pp"), want, rtol=1e-12)
    # The batch statistics come from every host: here a second host's [[0, 2]] (centred [-1, 1]).
    other = np.array([-1.0, 1.0])
    everything = np.concatenate([[0.5, -0.5, 0.0, 0.0, 1.0, -1.0], other])
    gathered = compute_advantages(r, "reinforce_pp", all_gather=lambda x: np.concatenate([x, other]))
    np.testing.assert_allclose(gathered, (want * std - everything.mean()) / (everything.std() + 1e-4))


# ----------------------------------------------------------------------------- DAPO's soft overlong
def _record(group: int, sample: int, n_tokens: int, answer: str = "4") -> RolloutRecord:
    return RolloutRecord(
        prompt_id=f"p{group}", group=group, sample=sample, prompt="q", prompt_ids=[1, 2],
        completion=f"<answer>{answer}</answer>", completion_ids=[5] * n_tokens, logprobs=[-1.0] * n_tokens,
        finish_reason="length" if n_tokens >= 10 else "stop", answer="4", policy="test",
    )  # fmt: skip


def test_soft_overlong_hand_computed():
    # L_MAX 10, L_CACHE 4: no penalty up to 6 tokens, then -1/4 per token, -1 from 10 on.
    np.testing.assert_array_equal(
        soft_overlong(np.array([0, 6, 7, 8, 10, 12]), 10, 4), [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    )
    records = [_record(0, i, n) for i, n in enumerate([3, 7, 9, 12])]
    cfg = ScoreConfig(rewards="correct=1.0", overlong="soft:10,4", overlong_penalty=2.0)
    scored, summary = score_records(records, cfg)
    assert [r.rewards["overlong"] for r in scored] == [0.0, -0.5, -1.5, -2.0]
    assert [r.reward for r in scored] == [1.0, 0.5, -0.5, -1.0]
    assert summary["rewards_mean"]["overlong"] == pytest.approx(-1.0)
    np.testing.assert_allclose(
        [r.advantage for r in scored], compute_advantages(np.array([[1.0, 0.5, -0.5, -1.0]]))[0]
    )


@pytest.mark.parametrize(
    "spec,message",
    [("soft:26", "soft:L_MAX,L_CACHE"), ("soft:4,10", "0 < L_CACHE <= L_MAX"), ("soft:a,b", "L_MAX"),
     ("soft:10,0", "0 < L_CACHE"), ("soft:L_MAX,L_CACHE", "in tokens"), ("hard", "soft:L_MAX,L_CACHE")],
)  # fmt: skip
def test_bad_soft_overlong_specs_are_refused(spec, message):
    with pytest.raises(BadInputError, match=message):
        ScoreConfig(overlong=spec)


def test_grpo_takes_soft_l_cache_with_l_max_the_max_new_tokens():
    assert build_config({"overlong": "soft:26"}).score_config().overlong == "soft:128,26"
    with pytest.raises(BadInputError, match="never applies"):
        build_config({"overlong": "soft:400,100"})


# ---------------------------------------------------------------------------------------- recipes
def test_the_dapo_and_gspo_recipes_run_on_the_embedded_default():
    dapo = build_config(read_config_file("dapo"))
    assert dapo.model == "smollm2-135m" and dapo.data.startswith("builtin:arith")
    loss = dapo.train_config().loss
    assert (loss.clip_low, loss.clip_high, loss.aggregation, loss.beta) == (0.2, 0.28, "token", 0.0)
    assert dapo.dynamic_sampling and dapo.score_config().overlong == "soft:128,26"
    gspo = build_config(read_config_file("gspo"))
    loss = gspo.train_config().loss
    assert (loss.ratio_level, loss.clip_low, loss.clip_high, loss.aggregation) == (
        "sequence",
        3e-4,
        4e-4,
        "sequence",
    )
    # With a model and data of the user's, a recipe sets the algorithm only.
    mine = build_config(read_config_file("gspo"), {"model": "ckpt", "data": "gsm8k"})
    assert mine.max_new_tokens == 1024 and mine.train_config().loss.ratio_level == "sequence"


# ------------------------------------------------------------------ estimator switch, replay buffer
def test_the_estimator_switch_reads_the_last_measured_entropy():
    from mllmjax.grpo.replay import parse_switch, step_mode

    assert parse_switch("entropy<0.2") == 0.2 and parse_switch(" entropy < 1e-1 ") == 0.1
    assert parse_switch(None) is None
    for bad in ("entropy>0.2", "entropy<-1", "entropy<nan", "kl<0.1", "entropy<"):
        with pytest.raises(BadInputError, match="estimator-switch"):
            parse_switch(bad)
    kw = {"estimator": "grpo", "group_size": 8, "prompts": 2}
    rows = [{"step": 0, "eval/accuracy": 0.1}]  # the step-0 evaluation measures no entropy
    assert step_mode(0.2, rows, **kw).reason == "no entropy measured yet"
    low = step_mode(0.2, [*rows, {"entropy": 0.15}, {"skipped": 1.0}], **kw)
    assert (low.estimator, low.group_size, low.prompts, low.reason) == (
        "reinforce",
        1,
        16,
        "entropy 0.15 < 0.2",
    )
    high = step_mode(0.2, [{"entropy": 0.15}, {"entropy": 0.25}], **kw)
    assert (high.estimator, high.group_size, high.prompts, high.reason) == (
        "grpo",
        8,
        2,
        "entropy 0.25 >= 0.2",
    )
    assert step_mode(None, [{"entropy": 0.01}], **kw).reason == ""


def test_the_switch_needs_a_per_group_estimator_and_replay_a_probability():
    with pytest.raises(BadInputError, match="per-group"):
        build_config({"estimator_switch": "entropy<0.2", "advantage": "reinforce", "dynamic_sampling": False})
    with pytest.raises(BadInputError, match="replay-prob"):
        build_config({"replay_prob": 1.5})
    with pytest.raises(BadInputError, match="replay-size"):
        build_config({"replay_prob": 0.5, "replay_size": 0})


def test_single_samples_score_with_reinforce_as_a_batch_z_score():
    records = [_record(g, 0, 3, answer=a) for g, a in enumerate(["4", "5", "4", "7"])]
    scored, summary = score_records(
        records, ScoreConfig(rewards="correct=1.0", advantage="reinforce", group_size=1)
    )
    r = np.array([1.0, 0.0, 1.0, 0.0])
    np.testing.assert_allclose([x.advantage for x in scored], (r - 0.5) / (0.5 + 1e-4))
    assert summary["frac_reward_zero_std"] == 0.0  # no group, so none without variance
    with pytest.raises(BadInputError, match="G must be an integer >= 2"):
        ScoreConfig(advantage="grpo", group_size=1)


def test_a_continuation_is_scored_on_its_partial_completion_and_what_follows():
    # The partial completion opened the answer tag; the continuation closes it: correct only together.
    rec = dataclasses.replace(_record(0, 0, 3), completion="4</answer>",
                              meta={"replay": {"prefix": "<think>2+2</think>\n<answer>", "from_step": 1}})  # fmt: skip
    plain = dataclasses.replace(rec, sample=1, meta={})
    scored, _ = score_records([rec, plain], ScoreConfig(rewards="correct=1.0,format=1.0"))
    assert scored[0].rewards == {"correct": 1.0, "format": 1.0}
    assert scored[1].rewards["format"] == 0.0


def test_the_replay_buffer_is_bounded_seeded_and_round_trips():
    from mllmjax.grpo.replay import ReplayBuffer, step_candidates

    def fill(seed):
        rng = np.random.default_rng(seed)
        buf = ReplayBuffer(3)
        for step in (1, 2):
            records = [_record(g, s, n) for g in range(2) for s, n in enumerate([1, 4, 6])]
            buf = buf.add(step_candidates(records, {0: 10 * step, 1: 10 * step + 1}, rng), step, rng)
        return buf

    buf = fill(0)
    assert len(buf.entries) == 3 and [e.step for e in buf.entries] == [1, 2, 2]  # the newest 3 of 4
    assert [e.problem for e in buf.entries] == [11, 20, 21]
    for e in buf.entries:  # a cut of a 4- or 6-token completion (never the 1-token one), 1..n-1 kept
        assert 1 <= len(e.prefix_ids) <= 5 and set(e.prefix_ids) == {5}
    assert fill(0) == buf
    assert ReplayBuffer.from_json(3, buf.to_json()) == buf
    # Draws: each slot is replaced with probability p while entries are left; drawn entries leave.
    slots, rest = buf.draw(10, 1.0, np.random.default_rng(1))
    assert sum(s is not None for s in slots) == 3 and slots[3:] == [None] * 7 and rest.entries == ()
    slots, rest = buf.draw(4, 0.0, np.random.default_rng(1))
    assert slots == [None] * 4 and rest == buf
    a, _ = buf.draw(6, 0.5, np.random.default_rng(7))
    b, _ = buf.draw(6, 0.5, np.random.default_rng(7))
    assert a == b
    # A vision-language run's completions that hold an image token are not continued (their prompt
    # would hold image tokens no image fills); a group with none left gives no candidate.
    records = [dataclasses.replace(_record(0, 0, 4), completion_ids=[5, 9, 5, 5]), _record(0, 1, 3),
               dataclasses.replace(_record(1, 0, 4), completion_ids=[9, 5, 5, 5])]  # fmt: skip
    got = step_candidates(records, {0: 3, 1: 4}, np.random.default_rng(0), avoid={9})
    assert got == [(3, [5, 5, 5])]
    assert len(step_candidates(records, {0: 3, 1: 4}, np.random.default_rng(0))) == 2


def test_length_shaping_is_no_signal_for_dynamic_sampling():
    """An all-wrong group whose lengths differ has varying total rewards under the soft penalty, but
    its task rewards are all equal: it counts as zero-variance and dynamic sampling drops it (DAPO
    filters on accuracy); a group with a right answer stays."""
    wrong = [_record(0, i, n, answer="5") for i, n in enumerate([3, 7, 9, 12])]
    mixed = [_record(1, i, n, answer=a) for i, (n, a) in enumerate([(3, "4"), (7, "5"), (3, "5"), (3, "5")])]
    cfg = ScoreConfig(rewards="correct=1.0", overlong="soft:10,4", filter_zero_variance=True)
    scored, summary = score_records(wrong + mixed, cfg)
    unfiltered, _ = score_records(wrong, dataclasses.replace(cfg, filter_zero_variance=False))
    assert [r.reward for r in unfiltered] == [0.0, -0.25, -0.75, -1.0]  # the totals do vary
    assert {r.group for r in scored} == {1} and summary["frac_reward_zero_std"] == 0.5
    assert summary["groups_dropped"] == 1
