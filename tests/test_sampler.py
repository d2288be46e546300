"""The compiled decoder against the full forward pass and against transformers' `generate`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import checkpoint_tensors

from mllmjax import models
from mllmjax.errors import BadInputError
from mllmjax.models import transformer
from mllmjax.models.cache import init_cache
from mllmjax.sampling import Greedy, Sample, compile_count, generate, sampler, stream
from mllmjax.weights.table import params_from_hf


@pytest.fixture(scope="module")
def tiny():
    cfg = models.tiny()
    return cfg, transformer.init_params(cfg, jax.random.key(0))


# ---------------------------------------------------------------- cache == full forward
@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per_layer"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_cached_decode_matches_full_forward(tiny, padding, per_layer):
    """Prefill a batch of prompts of different lengths, then decode the rest of each sequence one
    token per step; every step's logits equal the full (uncached, unpadded) forward pass's."""
    cfg, params = tiny
    rng = np.random.default_rng(0)
    total, lengths = 12, [5, 9, 3]
    seqs = rng.integers(0, cfg.vocab_size, size=(len(lengths), total))
    full = jax.jit(lambda t: transformer.logits(params, cfg, t))(jnp.asarray(seqs))  # [B, T, V]
    prefill = jax.jit(lambda t, p, v, c: transformer.forward(params, cfg, t, p, valid=v, cache=c))
    step = jax.jit(lambda t, p, c: transformer.forward(params, cfg, t, p, cache=c))
    rows = [[i] for i in range(len(lengths))] if padding == "none" else [list(range(len(lengths)))]
    for group in rows:
        p = max(lengths[i] for i in group) + (0 if padding == "none" else 4)
        tok = np.zeros((len(group), p), np.int32)
        val = np.zeros((len(group), p), bool)
        for r, i in enumerate(group):
            n = lengths[i]
            sl = slice(p - n, p) if padding == "left" else slice(0, n)
            tok[r, sl], val[r, sl] = seqs[i, :n], True
        pos = np.maximum(np.cumsum(val, axis=1) - 1, 0)
        cache = init_cache(cfg, len(group), 32, per_layer=per_layer)
        hidden, cache = prefill(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(val), cache)
        last = np.array([np.nonzero(v)[0][-1] for v in val])
        cache = cache.replace(index=jnp.asarray(last + 1, jnp.int32))
        got = [[transformer.logits_from_hidden(params, hidden[r, last[r]])] for r in range(len(group))]
        lens = np.array([lengths[i] for i in group])
        for t in range(total - min(lens)):
            # rows whose sequence is exhausted keep decoding a dummy token; only their prefix is checked
            cols = np.minimum(lens + t, total - 1)
            feed = seqs[group, cols][:, None]
            hidden, cache = step(jnp.asarray(feed), jnp.asarray((lens + t)[:, None]), cache)
            for r in range(len(group)):
                got[r].append(transformer.logits_from_hidden(params, hidden[r, 0]))
        for r, i in enumerate(group):
            n = lengths[i]
            want = np.asarray(full[i, n - 1 :])
            np.testing.assert_allclose(np.stack(got[r][: total - n + 1]), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_batched_padded_rows_equal_each_row_alone(tiny, unroll):
    cfg, params = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (1, 7, 3, 20, 12)]
    batch = generate(params, cfg, prompts, Greedy(), max_new_tokens=9, unroll_layers=unroll)
    for i, prompt in enumerate(prompts):
        alone = generate(params, cfg, [prompt], Greedy(), max_new_tokens=9, unroll_layers=not unroll)[0]
        assert batch[i].ids == alone.ids
        np.testing.assert_allclose(batch[i].logprobs, alone.logprobs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- against transformers
def _hf_model(family: str):
    torch = pytest.importorskip("torch")
    import transformers

    common = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if family == "llama":
        hf_cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=10000.0)
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        hf_cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1e6)
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        hf_cfg = transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False, rope_theta=1e6)
        cls = transformers.Qwen3ForCausalLM
    else:
        hf_cfg = transformers.Qwen3MoeConfig(**common, head_dim=24, tie_word_embeddings=False, rope_theta=1e6,
                                             num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                                             norm_topk_prob=True)  # fmt: skip
        cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2, "qwen3_moe": 3}[family])
    model = cls(hf_cfg).eval().to(torch.float32)
    return model, models.from_hf_config(hf_cfg.to_dict())


def _hf_greedy(model, prompt: list[int], max_new: int, eos: int | None = None):
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=eos,
            pad_token_id=0,
        )
    ids = out.sequences[0, len(prompt) :].tolist()
    logps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, ids, strict=False)]
    return ids, logps


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_greedy_matches_transformers(family):
    model, cfg = _hf_model(family)
    params = params_from_hf(cfg, checkpoint_tensors(model))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (1, 2, 5, 8, 13, 17, 30, 4, 11)]
    max_new = 12
    ours = generate(params, cfg, prompts, Greedy(), max_new_tokens=max_new)
    for prompt, got in zip(prompts, ours, strict=True):
        ids, logps = _hf_greedy(model, prompt, max_new)
        assert got.ids == ids
        assert got.finish_reason == "length"
        np.testing.assert_allclose(got.logprobs, logps, atol=1e-4, rtol=0)
    # Stopping: pick a token HF emits mid-way in prompt 0's completion as the stop id; HF with that eos
    # must give the same truncated sequence, and so must we (stop token included).
    ref, _ = _hf_greedy(model, prompts[0], max_new)
    stop = ref[max_new // 2]
    stopped = generate(params, cfg, prompts, Greedy(), max_new_tokens=max_new, stop_ids=[stop, 10_000])
    for prompt, got in zip(prompts, stopped, strict=True):
        ids, logps = _hf_greedy(model, prompt, max_new, eos=stop)
        assert got.ids == ids
        assert got.finish_reason == ("stop" if ids[-1] == stop else "length")
        np.testing.assert_allclose(got.logprobs, logps, atol=1e-4, rtol=0)
    assert stopped[0].finish_reason == "stop" and len(stopped[0].ids) <= max_new // 2 + 1


# ---------------------------------------------------------------- loop semantics
def test_group_sampling_shares_prefill_and_is_seeded(tiny):
    cfg, params = tiny
    prompts = [[5, 6, 7], [8, 9]]
    strategy = Sample(temperature=1.0, top_k=20)
    a = generate(params, cfg, prompts, strategy, n=4, max_new_tokens=8, seed=7)
    b = generate(params, cfg, prompts, strategy, n=4, max_new_tokens=8, seed=7, max_batch=4)
    c = generate(params, cfg, prompts, strategy, n=4, max_new_tokens=8, seed=8)
    assert [(x.prompt_index, x.sample_index) for x in a] == [(i, j) for i in range(2) for j in range(4)]
    assert [x.ids for x in a] == [x.ids for x in b]  # independent of how rows are batched
    assert [x.ids for x in a] != [x.ids for x in c]
    assert len({tuple(x.ids) for x in a[:4]}) > 1  # the n samples of a prompt differ
    # Each sample's log-probs are the full-vocabulary temperature-1 log-probs of its tokens.
    for comp in a[:2]:
        seq = jnp.asarray([prompts[0] + comp.ids])
        logp = jax.nn.log_softmax(transformer.logits(params, cfg, seq)[0], -1)
        want = [float(logp[len(prompts[0]) - 1 + t, tok]) for t, tok in enumerate(comp.ids)]
        np.testing.assert_allclose(comp.logprobs, want, atol=1e-4, rtol=0)


def test_temperature_logprobs_are_full_vocab_scaled(tiny):
    cfg, params = tiny
    prompt = [1, 2, 3, 4]
    comp = generate(params, cfg, [prompt], Sample(temperature=0.5, top_k=3), max_new_tokens=6, seed=2)[0]
    seq = jnp.asarray([prompt + comp.ids])
    logp = jax.nn.log_softmax(transformer.logits(params, cfg, seq)[0] / 0.5, -1)
    want = [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(comp.ids)]
    np.testing.assert_allclose(comp.logprobs, want, atol=1e-4, rtol=0)


def test_stream_matches_generate(tiny):
    cfg, params = tiny
    strategy = Sample(temperature=0.8)
    want = generate(params, cfg, [[3, 1, 4, 1, 5]], strategy, max_new_tokens=11, seed=3)[0]
    chunks = list(stream(params, cfg, [3, 1, 4, 1, 5], strategy, max_new_tokens=11, seed=3, chunk=4))
    assert [t for c in chunks for t in c.ids] == want.ids
    assert chunks[-1].finish_reason == want.finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("unroll", [True, False], ids=["per_layer", "stacked"])
def test_growing_cache_samples_what_one_full_cache_samples(tiny, monkeypatch, unroll):
    """The whole-run program decodes in windows and pads the cache between them; forcing a single
    full-length window must give the same tokens (stops, lengths) and log-probs."""
    cfg, params = tiny
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (3, 9, 14)]
    assert sampler.decode_windows(16, 128) == (48, 80, 112, 144)
    args = dict(n=2, max_new_tokens=100, seed=4, stop_ids=[7], unroll_layers=unroll)
    grown = generate(params, cfg, prompts, Sample(temperature=1.0), **args)
    monkeypatch.setattr(sampler, "decode_windows", lambda p, out: (p + out,))
    full = generate(params, cfg, prompts, Sample(temperature=1.0), **args)
    assert [c.ids for c in grown] == [c.ids for c in full]
    assert [c.finish_reason for c in grown] == [c.finish_reason for c in full]
    for a, b in zip(grown, full, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
    # Rows stop inside a later window and others run through all four.
    lengths = [len(c.ids) for c in grown]
    assert max(lengths) == 100 and any(32 < n < 100 for n in lengths)


def test_context_limit_and_bad_input(tiny):
    cfg, params = tiny
    short = models.tiny(max_position_embeddings=20)
    comp = generate(params, short, [[1] * 15], Greedy(), max_new_tokens=50)[0]
    assert len(comp.ids) == 5 and comp.finish_reason == "length"
    with pytest.raises(BadInputError, match="context"):
        generate(params, short, [[1] * 20], Greedy(), max_new_tokens=1)
    with pytest.raises(BadInputError, match="empty"):
        generate(params, cfg, [[]], Greedy(), max_new_tokens=1)
    with pytest.raises(BadInputError, match="vocabulary"):
        generate(params, cfg, [[cfg.vocab_size]], Greedy(), max_new_tokens=1)
    with pytest.raises(BadInputError, match="max_new_tokens"):
        generate(params, cfg, [[1]], Greedy(), max_new_tokens=0)


def test_compilations_are_bounded_by_buckets(tiny):
    _, params = tiny
    cfg = models.tiny(max_position_embeddings=500)  # a config no other test compiled for
    rng = np.random.default_rng(5)
    before = compile_count()
    shapes = set()
    for batch in (1, 2, 3, 5, 7, 8, 3, 6):
        lengths = rng.integers(1, 30, size=batch)
        prompts = [rng.integers(0, cfg.vocab_size, size=int(n)).tolist() for n in lengths]
        for max_new in (3, 9, 14):
            generate(params, cfg, prompts, Greedy(), max_new_tokens=max_new, max_batch=8)
            shapes.add((1 << (batch - 1).bit_length(), sampler.prompt_bucket(int(lengths.max()))))
    # batch buckets {1,2,4,8} x prompt buckets {16,24,32}: 24 runs, at most 12 programs (one per shape).
    assert compile_count() - before == len(shapes) <= 12
    assert [sampler.prompt_bucket(n) for n in (1, 16, 17, 24, 25, 33, 49, 65, 129)] == [
        16,
        16,
        24,
        24,
        32,
        48,
        64,
        96,
        192,
    ]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_hf):
    """The real SmolLM2-135M-Instruct (embedded GGUF, dequantised to float32 by transformers and
    mapped through our weights table): 8 chat prompts of different lengths in one batch. The HF model
    is the session's (conftest.smollm2_hf): dequantising the GGUF once is 30-40 s of CI."""
    model, tok = smollm2_hf
    cfg = models.from_hf_config(model.config.to_dict())
    params = params_from_hf(cfg, model.state_dict())
    questions = [
        "Hi!",
        "What is 12 times 7?",
        "Name three primary colours.",
        "Write one sentence about the sea.",
        "If a train travels 60 km in 1.5 hours, what is its average speed in km per hour? Explain.",
        "List the planets of the solar system in order from the sun, separated by commas.",
        "Translate 'good morning' into French.",
        "Tom has 3 apples and buys 5 more, then gives 2 to Ann. How many apples does Tom have now?",
    ]
    prompts = [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        for q in questions
    ]
    assert len({len(p) for p in prompts}) >= 6
    max_new = 24
    ours = generate(params, cfg, prompts, Greedy(), max_new_tokens=max_new, stop_ids=[tok.eos_token_id])
    for prompt, got in zip(prompts, ours, strict=True):
        ids, logps = _hf_greedy(model, prompt, max_new, eos=tok.eos_token_id)
        assert got.ids == ids
        np.testing.assert_allclose(got.logprobs, logps, atol=1e-4, rtol=0)


def test_rope_scaled_config_samples_like_the_full_forward():
    """A config with rope scaling (stored as a tuple so the config is hashable) goes through the
    sampler's program cache; greedy tokens equal the argmax of full forwards over the growing prefix."""
    cfg = models.tiny("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    params = transformer.init_params(cfg, jax.random.key(3))
    prompt = [5, 9, 17, 2, 33]
    (out,) = generate(params, cfg, [prompt], Greedy(), max_new_tokens=4, stop_ids=[])
    seq = list(prompt)
    for _ in range(4):
        seq.append(int(np.asarray(transformer.logits(params, cfg, np.asarray([seq])))[0, -1].argmax()))
    assert out.ids == seq[len(prompt) :]


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=2,tensor=2", "tensor=4,fsdp=2"])
def test_sampling_on_8_devices_equals_one_device(tiny, spec):
    """The sampler on a mesh of the 8 fake CPU devices (params sharded by the rules, the batch split over
    the data axes, the KV cache placed by XLA from them) gives the one-device completions."""
    from mllmjax.sharding import make_mesh, shard_params

    cfg, params = tiny
    mesh = make_mesh(spec)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    strategy = Sample(temperature=1.0, top_k=20)
    one = generate(params, cfg, prompts, strategy, n=2, max_new_tokens=8, seed=3)
    many = generate(shard_params(params, cfg, mesh), cfg, prompts, strategy, n=2, max_new_tokens=8, seed=3,
                    mesh=mesh)  # fmt: skip
    assert [c.ids for c in one] == [c.ids for c in many]
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
