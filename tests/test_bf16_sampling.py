"""The sampler in bfloat16 against float32: the KV cache's dtype, per-step log-probs and greedy tokens
within bfloat16's precision, and decode-step attention keeping its scores and softmax in float32.

bfloat16 keeps 8 significant bits, so one rounding (to nearest) has relative error at most u = 2^-8.
The reference is transformers in float32 (test_sampler.py checks our float32 sampler against it on
short prompts; here again, past position 256).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hf_models import checkpoint_tensors

from mllmjax import models
from mllmjax.models.blocks.attention import attention
from mllmjax.sampling import Greedy, generate, sampler
from mllmjax.weights.table import params_from_hf

U = 2.0**-8  # bfloat16's unit roundoff
F32, BF16 = np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def qwen3():
    """(transformers model, config, params) of a tiny Qwen3 (q/k norms, GQA) in float32, with random
    norm weights and its LM head scaled so that the logits have a standard deviation of about 4:
    greedy picks a clear winner at most steps and the log-probs are far from uniform."""
    torch = pytest.importorskip("torch")
    import transformers

    hf_cfg = transformers.Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(hf_cfg).eval().to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.lm_head.weight.mul_(25.0)
    cfg = models.from_hf_config(hf_cfg.to_dict())
    return model, cfg, params_from_hf(cfg, checkpoint_tensors(model))


# ---------------------------------------------------------------- the KV cache's dtype
class _Traced(Exception):
    pass


def _loop_states(monkeypatch, params, cfg, **kwargs):
    """The decode-loop states (shapes and dtypes only) of the programs `generate(**kwargs)` asks for:
    its prefill and decode programs traced by jax.eval_shape, nothing compiled or run."""
    real = sampler.compiled
    states = []

    def spy(*args):
        _, prefill, decode = real(*args)

        def trace(params, tokens, valid, limit, keys, stops, prefix=None):
            state = jax.eval_shape(prefill, params, tokens, valid, limit, keys, stops)
            states.extend([state, jax.eval_shape(decode, params, state, jnp.int32(2), stops)])
            raise _Traced

        return trace, prefill, decode

    monkeypatch.setattr(sampler, "compiled", spy)
    with pytest.raises(_Traced):
        generate(params, cfg, [[5, 6, 7]], Greedy(), max_new_tokens=4, **kwargs)
    return states


@pytest.mark.parametrize("unroll", [True, False], ids=["per_layer", "stacked"])
@pytest.mark.parametrize(
    "param_dtype, compute_dtype, cache_dtype",
    [
        (F32, None, F32),
        (F32, "bfloat16", BF16),  # float32 master weights, bfloat16 compute (grpo --compute-dtype)
        (BF16, None, BF16),  # a bfloat16 checkpoint (sample --dtype bfloat16)
        (BF16, "float32", F32),
    ],
)
def test_kv_cache_is_kept_in_the_compute_dtype(
    qwen3, monkeypatch, unroll, param_dtype, compute_dtype, cache_dtype
):
    _, cfg, params = qwen3
    params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    states = _loop_states(monkeypatch, params, cfg, compute_dtype=compute_dtype, unroll_layers=unroll)
    for state in states:  # after the prefill, and after decode steps
        cache = state.cache
        assert cache.per_layer == unroll
        arrays = jax.tree.leaves((cache.k, cache.v))
        assert len(arrays) == (2 * cfg.num_layers if unroll else 2)
        assert {a.dtype for a in arrays} == {cache_dtype}
        assert cache.pos.dtype == np.int32 and state.out_logprobs.dtype == F32


def _unrotate(x: np.ndarray, pos: int, inv: np.ndarray) -> np.ndarray:
    """Undo rotate-half RoPE at position pos on x [..., H] (float64)."""
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * c + x2 * s, x2 * c - x1 * s], axis=-1)


def test_bfloat16_decode_loop_keeps_positions_exact(qwen3):
    """The loop state of a bfloat16 decode past position 256 (the streaming prefill and decode
    programs, which `generate` shares): the cache really holds bfloat16 keys and values, slot
    positions are exact int32, the prompt's keys were rotated by their exact positions, and the RoPE
    tables carried for the next step are cos/sin of the exact position. bfloat16 holds integers
    exactly only up to 256 (8 significant bits): a position that went through it would be off by one
    at 297, 299, 301, 303, a whole radian in the fastest rotation."""
    _, cfg, params = qwen3
    length, out_len, same = 301, 16, (5, 297, 299)
    tokens = np.zeros((1, sampler.prompt_bucket(length)), np.int32)
    tokens[0, :length] = np.random.default_rng(1).integers(0, cfg.vocab_size, length)
    tokens[0, list(same)] = 7  # one token at three positions
    valid = np.arange(tokens.shape[1])[None] < length
    # the CPU's programs: unrolled layers over a per-layer cache
    _, prefill, decode = sampler.compiled(
        cfg, Greedy(), "bfloat16", 1, (tokens.shape[1] + out_len,), out_len, True
    )
    stops = jnp.asarray([-1], jnp.int32)
    keys = jnp.stack([jax.random.key(0)])
    state = prefill(params, tokens, valid, np.int32([out_len]), keys, stops)
    half = cfg.head_dim // 2
    inv = 1.0 / 10000.0 ** (np.arange(half) * 2.0 / cfg.head_dim)  # float64, default RoPE

    # A layer-0 key depends only on its token and position: the bfloat16 keys k_p = R(p) kappa of the
    # token at 5, 297 and 299, rotated back by their positions, are one vector kappa. Each entry was
    # rounded to bfloat16 after its rotation (and kappa's may round differently once in a rare tie):
    # per rotation pair (a, b), |error| <= 2 u |(a, b)| per key, 4 u between two of them.
    k0 = np.asarray(state.cache.k[0][0]).transpose(2, 0, 1)  # layer 0, row 0: [B, K, H, S] -> [S, K, H]
    assert k0.dtype == BF16
    back = {p: _unrotate(np.asarray(k0[p], np.float64), p, inv) for p in same}
    pair_norm = np.hypot(*np.split(back[5], 2, axis=-1))
    for p in same[1:]:
        gap = np.hypot(*np.split(back[p] - back[5], 2, axis=-1))
        assert (gap <= 4 * U * pair_norm + 1e-6).all(), (p, (gap / pair_norm).max())

    for step in range(3):
        if step:
            state = decode(params, state, jnp.int32(step + 1), stops)
        pos = length + step  # the position the next token takes
        assert int(state.pos[0]) == pos and int(state.count[0]) == step + 1
        cos, sin = (np.asarray(x, np.float64).reshape(half) for x in state.rope)
        # float32 tables: the angle pos * inv is rounded to ~pos * 2^-23 radians
        np.testing.assert_allclose(cos, np.cos(pos * inv), atol=1e-4, rtol=0)
        np.testing.assert_allclose(sin, np.sin(pos * inv), atol=1e-4, rtol=0)
        cache = state.cache
        assert {a.dtype for a in jax.tree.leaves((cache.k, cache.v))} == {BF16}
        held = np.asarray(cache.pos[0])
        assert held.dtype == np.int32 and int(cache.index[0]) == pos
        np.testing.assert_array_equal(np.sort(held[held >= 0]), np.arange(pos))


# ---------------------------------------------------------------- bfloat16 decoding against float32
def test_bfloat16_greedy_decoding_tracks_float32(qwen3):
    """Float32 weights decoded with bfloat16 compute (so a bfloat16 KV cache) against the float32
    decoder: the same greedy tokens wherever float32's top two logits are further apart than
    bfloat16's error can close, and every step's log-prob within that error. One prompt runs past
    position 256, beyond which bfloat16 cannot hold positions (integers above 256 lose their last
    bits), so RoPE must take them in float32.

    The bound. A logit z = h . w is reached through about 30 bfloat16 roundings (per layer: the
    normed input, the q/k/v/o and gate/up/down weights and outputs, q/k norms, RoPE, the
    probabilities, the attention output, the residual adds; then the final norm and the head), each
    a relative error of at most u. Independent errors add in quadrature: sqrt(30) u ~ 5.5 u relative
    error on each activation, hence on each logit about 5.5 u times the logits' scale (their rms
    over the vocabulary, ~4 here). The largest of V = 256 logits x 12 steps of such errors is about
    3 of those, and we allow no more than that: |dz| <= TOL_Z = 16 u rms(z) (a 2-layer model of
    this init does not amplify errors further: this model's bfloat16 forward over 3 x 312 random
    tokens is off by at most 8 u rms(z)). A log-prob
    log p_t = z_t - logsumexp(z) moves by at most |dz_t| + max_j |dz_j| <= 2 TOL_Z, and two logits
    further apart than 2 TOL_Z keep their order.
    """
    import torch

    model, cfg, params = qwen3
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (3, 11, 300)]
    n_new = 12
    f32 = generate(params, cfg, prompts, Greedy(), max_new_tokens=n_new)
    bf16 = generate(params, cfg, prompts, Greedy(), max_new_tokens=n_new, compute_dtype=jnp.bfloat16)

    common_total, diffs = 0, []
    for p, a, b in zip(prompts, f32, bf16, strict=True):
        assert len(a.ids) == len(b.ids) == n_new
        # transformers' float32 logits of each new token of the float32 completion
        with torch.no_grad():
            z = model(torch.tensor([p + a.ids])).logits[0, len(p) - 1 : -1].double().numpy()  # [N, V]
        top = z.max(-1, keepdims=True)
        logp = z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))
        steps = np.arange(n_new)
        # our float32 decoder is transformers' greedy decoding (so the reference is right at 300+)
        assert a.ids == z.argmax(-1).tolist()
        np.testing.assert_allclose(a.logprobs, logp[steps, a.ids], atol=1e-4, rtol=0)

        tol_z = 16 * U * np.sqrt((z**2).mean())
        top2 = np.sort(z, -1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        common = next((t for t in range(n_new) if a.ids[t] != b.ids[t]), n_new)
        common_total += common
        if common < n_new:  # bfloat16 may only pick another token where float32's top two are close
            assert margin[common] < 2 * tol_z, (len(p), common, margin[common], tol_z)
        # Up to and including the first different token the prefixes are equal, so the float32
        # log-probs of bfloat16's tokens are known.
        upto = min(common + 1, n_new)
        got = np.asarray(b.logprobs[:upto])
        want = logp[steps[:upto], b.ids[:upto]]
        np.testing.assert_allclose(got, want, atol=2 * tol_z, rtol=0)
        diffs.append(np.abs(got - want).max())
    # The greedy paths mostly agree (this is a test of the log-probs along them), and bfloat16 was
    # really used: its rounding shows in the log-probs (identical programs would give 0).
    assert common_total >= 2 * n_new
    assert max(diffs) > U / 16


# ---------------------------------------------------------------- decode-step attention precision
def test_bfloat16_decode_attention_keeps_scores_and_softmax_in_float32():
    """One decode step's attention over a bfloat16 cache (the per-layer layout), against float64.

    The products of bfloat16 q and k are exact in float32 and their float32 sums are exact to 2^-24,
    so the only roundings allowed are the probabilities' cast to bfloat16 for the value product and
    the output's: |out - ref| <= u sum_s p_s |v_s| + u |ref| (to first order in u; plus float32
    accumulation, ~2^-24). The scores here lie between 16 and 64 (about 32 +- 2), where bfloat16's
    spacing is 0.125 to 0.25: scores or a softmax taken in bfloat16 would move each probability by up
    to e^0.0625 - 1 ~ 6% or more, some 20 times u.
    """
    rng = np.random.default_rng(0)
    b, kv, g, h, s = 2, 2, 2, 16, 40
    n = kv * g

    def bf16(x):
        return np.asarray(x, np.float32).astype(BF16)

    q = rng.normal(0, 1.5, (b, 1, n, h))
    k = rng.normal(0, 1.5, (b, kv, h, s))
    q[..., 0], k[:, :, 0, :] = 8.0, 16.0  # a shared 8 * 16 / sqrt(16) = 32 in every score
    v = rng.normal(0, 1.0, (b, kv, s, h))
    q, k, v = bf16(q), bf16(k), bf16(v)
    k_pos = np.tile(np.arange(s), (b, 1))
    k_pos[0, 30:] = -1  # row 0: 30 cached tokens, then empty slots
    q_pos = k_pos.max(1, keepdims=True)

    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(q_pos), jnp.asarray(k_pos),
                    cache_layout=True)  # fmt: skip
    assert out.dtype == BF16 and out.shape == (b, 1, n, h)

    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    bound = np.zeros((b, 1, n, h))
    ref = np.zeros((b, 1, n, h))
    for r in range(b):
        for head in range(n):
            j = head // g  # the kv head of this query head (HF's repeat_kv)
            scores = q64[r, 0, head] @ k64[r, j] / np.sqrt(h)
            assert scores.min() > 16 and scores.max() < 64
            scores = np.where(k_pos[r] >= 0, scores, -np.inf)
            p = np.exp(scores - scores.max())
            p /= p.sum()
            ref[r, 0, head] = p @ v64[r, j]
            bound[r, 0, head] = U * (p @ np.abs(v64[r, j]) + np.abs(ref[r, 0, head])) + 1e-6
    err = np.abs(np.asarray(out, np.float64) - ref)
    assert (err <= bound).all(), (err / bound).max()
