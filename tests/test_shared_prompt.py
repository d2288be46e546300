"""The shared-prompt forward and backward (`Trainer` with shared_prompt, `transformer.fold_groups`):
each group's prompt runs once and its rows' completions attend to it. Against the per-row forward of
the same batch, on every family: log-probs within 1e-5, the gradient within 1e-5 of its scale, with
left-padded prompts of different lengths, micro-batches that split a group, remat, and 8 devices."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import save_hf_model

from mllmjax.checkpoint import load_checkpoint
from mllmjax.convert import convert
from mllmjax.errors import BadInputError
from mllmjax.loss import LossConfig
from mllmjax.optim import OptimConfig
from mllmjax.records import RolloutRecord
from mllmjax.trainer import Batch, TrainConfig, Trainer, validate_batch
from mllmjax.training import batch_from_records, prompt_rows

G, P, C = 4, 9, 8  # rows per prompt, prompt width (left-padded), completion width
PROMPT_LENS = (3, 9, 6)  # one group each: padding of 6, 0 and 3 columns
FAMILIES = ["llama-linear-rope-bias", "qwen2", "qwen3", "gemma2", "gemma3", "qwen3-moe"]
_ckpts: dict[str, object] = {}


def _ckpt(name: str, tmp_path_factory):
    if name not in _ckpts:
        folder = tmp_path_factory.mktemp(name)
        save_hf_model(name, folder / "hf", seed=1)
        convert(str(folder / "hf"), folder / "ck")
        _ckpts[name] = load_checkpoint(folder / "ck")
    return _ckpts[name]


def _batch(vocab: int, seed: int = 0) -> Batch:
    """Three groups of G rows: a prompt per group (3, 9 and 6 tokens, left-padded to P), completions of
    1..C tokens (right-padded), and advantages and old log-probs that differ per row."""
    rng = np.random.default_rng(seed)
    b, t = len(PROMPT_LENS) * G, P + C
    tokens = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    valid = np.zeros((b, t), bool)
    completion = np.zeros((b, t), bool)
    for j, n in enumerate(PROMPT_LENS):
        prompt = rng.integers(1, vocab, n)
        for r in range(j * G, (j + 1) * G):
            m = [1, C, 5, 3][r % G]  # a one-token and a full-width completion in every group
            tokens[r, P - n : P] = prompt
            tokens[r, P : P + m] = rng.integers(1, vocab, m)
            positions[r, P - n : P + m] = np.arange(n + m)
            valid[r, P - n : P + m] = True
            completion[r, P : P + m] = True
    return Batch(
        tokens=jnp.asarray(tokens),
        positions=jnp.asarray(positions),
        valid=jnp.asarray(valid),
        completion=jnp.asarray(completion),
        advantages=jnp.asarray(rng.normal(size=b), jnp.float32),
        old_logps=jnp.asarray(np.where(completion, -2.0 + 0.3 * rng.normal(size=(b, t)), 0.0), jnp.float32),
        completion_start=P,
        prompt_rows=G,
    )


@pytest.fixture
def groupings(monkeypatch) -> list:
    """The `shared` argument of every model forward the trainer traces: proof of which path ran."""
    import mllmjax.trainer as trainer_module

    seen: list = []
    real = trainer_module.forward

    def spy(*args, **kw):
        seen.append(kw.get("shared"))
        return real(*args, **kw)

    monkeypatch.setattr(trainer_module, "forward", spy)
    return seen


def _trainers(cfg, params, **kw) -> tuple[Trainer, Trainer]:
    tcfg = TrainConfig(loss=LossConfig(beta=0.04, entropy_coef=0.01), **kw)
    shared = Trainer(cfg, tcfg, ref_params=params)
    rows = Trainer(cfg, dataclasses.replace(tcfg, shared_prompt=False), ref_params=params)
    return shared, rows


def _assert_grads_close(a, b) -> None:
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = np.abs(y).max()
        assert scale > 0, jax.tree_util.keystr(path)  # every parameter gets a gradient
        assert np.abs(x - y).max() <= 1e-5 * scale, jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", FAMILIES)
def test_log_probs_and_gradient_equal_the_per_row_forward(name, tmp_path_factory, groupings):
    ckpt = _ckpt(name, tmp_path_factory)
    batch = _batch(ckpt.cfg.vocab_size)
    shared, rows = _trainers(ckpt.cfg, ckpt.params)
    want = np.asarray(rows.logprobs(ckpt.params, batch))
    got = np.asarray(shared.logprobs(ckpt.params, batch))
    mask = np.asarray(batch.completion)
    assert np.abs(got - want).max() <= 1e-5 and (got[:, :P] == 0).all() and (got[mask] < 0).all()
    ref = rows.reference_logprobs(batch)  # the KL term's reference, as train_on_batch fills it in
    batch = batch.replace(ref_logps=ref)
    g_rows, m_rows, _ = rows.grads(ckpt.params, batch)
    # Whole groups in one pass, then micro-batches of 2 rows that split every group in two.
    for micro in (None, 2):
        g, m, logp = shared.grads(ckpt.params, batch, micro_batch=micro)
        _assert_grads_close(g, g_rows)
        assert np.abs(np.asarray(logp) - want).max() <= 1e-5
        for key in ("loss", "kl", "entropy", "ratio_mean"):
            np.testing.assert_allclose(float(m[key]), float(m_rows[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    # Traced: per row, the log-probs (the reference reuses them) and the gradient; shared, the
    # log-probs over groups of 4, the gradient over groups of 4 and over runs of 2.
    assert groupings == [None, (P, G), None, (P, G), (P, 2)]


def test_remat_and_the_scanned_layers(tmp_path_factory, groupings):
    """The same under a remat policy, which scans the layers and recomputes each in the backward."""
    ckpt = _ckpt("qwen3", tmp_path_factory)
    batch = _batch(ckpt.cfg.vocab_size, seed=1)
    shared, rows = _trainers(ckpt.cfg, ckpt.params, remat="nothing_saveable")
    batch = batch.replace(ref_logps=rows.reference_logprobs(batch))
    g_rows, _, want = rows.grads(ckpt.params, batch)
    g, _, got = shared.grads(ckpt.params, batch, micro_batch=6)  # runs of 2 rows (gcd of 4 and 6)
    _assert_grads_close(g, g_rows)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5
    assert groupings[-1] == (P, 2)


def test_updates_on_8_devices_equal_the_per_row_updates_on_one(tmp_path_factory, groupings):
    """PPO epochs with minibatches and micro-batches: groups are shuffled whole, sharded over data x
    fsdp, and the parameters after 3 updates equal the per-row path's on one device."""
    from mllmjax.sharding import make_mesh, place_rows, shard_params

    assert jax.device_count() == 8  # tests/conftest.py asks XLA for 8 host devices
    ckpt = _ckpt("llama-linear-rope-bias", tmp_path_factory)
    batch = _batch(ckpt.cfg.vocab_size, seed=2).replace(old_logps=None)
    kw = dict(optim=OptimConfig(name="adamw", peak_lr=1e-3, total_updates=6, weight_decay=0.0), ppo_epochs=3,
              minibatches=3, micro_batch=2)  # fmt: skip
    shared, rows = _trainers(ckpt.cfg, ckpt.params, **kw)
    one, hist_one = rows.train_on_batch(rows.init_state(ckpt.params, jax.random.PRNGKey(3)), batch)
    mesh = make_mesh("data=2,fsdp=4,tensor=1")
    placed = shard_params(ckpt.params, ckpt.cfg, mesh)
    shared = Trainer(ckpt.cfg, shared.cfg, ref_params=placed)
    many, hist_many = shared.train_on_batch(
        shared.init_state(placed, jax.random.PRNGKey(3)), place_rows(batch, mesh)
    )
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    assert len(hist_one) == len(hist_many) == 9
    assert groupings[-1] == (P, 2)  # minibatches of one group, micro-batches of half of one
    for h1, h8 in zip(hist_one, hist_many, strict=True):
        for key in ("loss", "kl", "grad_norm", "ratio_mean"):
            np.testing.assert_allclose(h1[key], h8[key], atol=1e-5, rtol=1e-5, err_msg=key)


def _record(group: int, sample: int, prompt: list[int]) -> RolloutRecord:
    return RolloutRecord(
        prompt_id=f"p{group}", group=group, sample=sample, prompt="q", prompt_ids=prompt, completion="a",
        completion_ids=[5, 6], logprobs=[-1.0, -1.0], finish_reason="stop", answer="1", policy="x", meta={},
        rewards={"correct": 0.0}, reward=float(sample), advantage=0.5 - sample % 2, reward_errors={},
    )  # fmt: skip


def test_groups_are_found_in_the_records_and_a_wrong_claim_is_refused():
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3]]  # the third group repeats the first's prompt
    records = [_record(g, s, prompts[g]) for g in range(3) for s in range(G)]
    assert prompt_rows([r.prompt_ids for r in records]) == G
    assert batch_from_records(records).prompt_rows == G
    # Two neighbouring groups of one prompt are one run; rows out of group order share nothing.
    assert prompt_rows([[1], [1], [1], [1], [2], [2], [2], [2]]) == 4
    assert prompt_rows([[1], [1], [1], [1], [1], [1], [1], [1]]) == 8
    assert prompt_rows([r.prompt_ids for r in records[1:] + records[:1]]) == 1
    batch = _batch(50)
    validate_batch(batch)
    validate_batch(batch.replace(prompt_rows=2))  # half a group: still one prompt per run
    wrong = batch.replace(prompt_rows=6)  # runs of 6 rows span two prompts
    with pytest.raises(BadInputError, match="prompt_rows is 6 but rows of one run differ in tokens"):
        validate_batch(wrong)
    with pytest.raises(BadInputError, match="prompt_rows 5 does not divide the batch of 12 rows"):
        validate_batch(batch.replace(prompt_rows=5))
    assert batch.rows(jnp.arange(12)).prompt_rows == 1  # an arbitrary selection claims nothing
