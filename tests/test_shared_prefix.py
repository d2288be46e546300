"""The sampler's shared-prefix prefill: a prefix that every prompt of a batch starts with is prefilled
once and its cache repeated over the rows; completions equal those of the plain per-prompt prefill (and
transformers' `generate`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hf_models import checkpoint_tensors
from test_sampler import _hf_greedy, _hf_model

from mllmjax import models
from mllmjax.models import transformer
from mllmjax.models.registry import FAMILIES
from mllmjax.sampling import Greedy, Sample, generate, sampler
from mllmjax.sampling.buckets import floor_bucket
from mllmjax.weights.table import params_from_hf


def _prompts(vocab: int, prefix_len: int = 70, tails: tuple[int, ...] = (1, 5, 12, 3), seed: int = 0):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(1, vocab, size=prefix_len).tolist()
    return [prefix + rng.integers(1, vocab, size=n).tolist() for n in tails]


@pytest.fixture
def prefix_spy(monkeypatch):
    """The prefix lengths the sampler's whole-run programs were called with (0: none), one per batch."""
    seen: list[int] = []
    original = sampler.compiled

    def compiled(*args, **kwargs):
        run, prefill, decode = original(*args, **kwargs)

        def spied(*a):
            seen.append(0 if a[-1] is None else a[-1].shape[1])
            return run(*a)

        return spied, prefill, decode

    monkeypatch.setattr(sampler, "compiled", compiled)
    return seen


def test_floor_bucket_is_the_largest_bucket_not_above():
    assert [floor_bucket(n) for n in (16, 23, 24, 31, 32, 47, 48, 279, 383, 384, 512)] == [
        16, 16, 24, 24, 32, 32, 48, 256, 256, 384, 512,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        floor_bucket(15)


def test_shared_prefix_length():
    base = list(range(1, 280))  # 279 shared tokens, as in the built-in tasks' prompts
    prompts = [base + [500 + i] * (20 + i) for i in range(4)]
    assert sampler.shared_prefix(prompts) == 256
    assert sampler.shared_prefix(prompts[:1]) == 0  # one prompt: prefilled once anyway
    assert sampler.shared_prefix([base[:40] + [1], base[:40] + [2]]) == 0  # under MIN_SHARED_PREFIX
    # A prompt that is the prefix itself keeps its last token to prefill on its own row.
    assert sampler.shared_prefix([base[:96], base[:96] + [7, 8]]) == 64  # 95, not 96
    # Not worth it: two prompts whose common part is short beside their own long tails.
    long = [base[:70] + [3] * 300, base[:70] + [4] * 300]
    assert sampler.shared_prefix(long) == 0


@pytest.mark.parametrize("unroll", [False, True], ids=["stacked", "per_layer"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_prefix_samples_what_per_prompt_prefill_samples(family, unroll, prefix_spy):
    """Every family (Gemma's ring buffers of a window far shorter than the prefix included), greedy and
    sampled groups: the same tokens and log-probs within 1e-5 as prefilling each prompt alone."""
    cfg = models.tiny(family)
    params = transformer.init_params(cfg, jax.random.key(1))
    prompts = _prompts(cfg.vocab_size)
    for strategy, n in ((Greedy(), 1), (Sample(temperature=1.0, top_k=40), 3)):
        prefix_spy.clear()
        shared = generate(params, cfg, prompts, strategy, n=n, max_new_tokens=10, seed=5, unroll_layers=unroll)
        assert prefix_spy == [64]
        plain = generate(params, cfg, prompts, strategy, n=n, max_new_tokens=10, seed=5, unroll_layers=unroll,
                         share_prefix=False)  # fmt: skip
        assert prefix_spy == [64, 0]
        assert [c.ids for c in shared] == [c.ids for c in plain]
        assert [c.finish_reason for c in shared] == [c.finish_reason for c in plain]
        for a, b in zip(shared, plain, strict=True):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_shared_prefix_greedy_matches_transformers(family, prefix_spy):
    """An independent reference: HF `generate` of each whole prompt alone."""
    model, cfg = _hf_model(family)
    params = params_from_hf(cfg, checkpoint_tensors(model))
    prompts = _prompts(cfg.vocab_size, prefix_len=100, tails=(2, 9, 1), seed=4)
    ours = generate(params, cfg, prompts, Greedy(), max_new_tokens=12)
    assert prefix_spy == [96]
    for prompt, got in zip(prompts, ours, strict=True):
        ids, logps = _hf_greedy(model, prompt, 12)
        assert got.ids == ids
        np.testing.assert_allclose(got.logprobs, logps, atol=1e-4, rtol=0)


def test_prefix_is_per_batch_and_limits_count_the_whole_prompt(prefix_spy):
    """Batches are packed by length, each with its own shared prefix (or none); a row's new-token limit
    counts the prefix against the model's context."""
    cfg = models.tiny("llama", max_position_embeddings=96)
    params = transformer.init_params(cfg, jax.random.key(2))
    rng = np.random.default_rng(3)
    other = rng.integers(1, cfg.vocab_size, size=8).tolist()
    prompts = _prompts(cfg.vocab_size, prefix_len=80, tails=(4, 2, 9, 6), seed=1) + [other, other[:5]]
    got = generate(params, cfg, prompts, Greedy(), max_new_tokens=20, max_batch=4)
    assert prefix_spy == [64, 0]  # the four long prompts, then the two short ones
    alone = [generate(params, cfg, [p], Greedy(), max_new_tokens=20)[0] for p in prompts]
    assert [c.ids for c in got] == [c.ids for c in alone]
    assert [len(c.ids) for c in got[:4]] == [96 - len(p) for p in prompts[:4]]  # up to the context
    assert all(c.finish_reason == "length" for c in got)


def test_shared_prefix_on_8_devices_equals_one_device(prefix_spy):
    """The prefix row is whole on every device, the rest of the batch split over the data axes."""
    from mllmjax.sharding import make_mesh, shard_params

    cfg = models.tiny()
    params = transformer.init_params(cfg, jax.random.key(0))
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    prompts = _prompts(cfg.vocab_size, tails=(3, 1, 7, 2))
    strategy = Sample(temperature=1.0, top_k=20)
    one = generate(params, cfg, prompts, strategy, n=2, max_new_tokens=8, seed=3, share_prefix=False)
    many = generate(shard_params(params, cfg, mesh), cfg, prompts, strategy, n=2, max_new_tokens=8, seed=3,
                    mesh=mesh)  # fmt: skip
    assert prefix_spy == [0, 64]
    assert [c.ids for c in one] == [c.ids for c in many]
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
