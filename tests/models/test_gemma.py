"""Gemma 2 and Gemma 3 (text) beyond the shared parity tests of test_decoder_parity.py: greedy
decoding against transformers' `generate` past the sliding window, the soft-capped loss, the HF
config spellings, export back to transformers, and what is refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import make_hf_model, save_hf_model

from mllmjax import models
from mllmjax.convert import convert, export
from mllmjax.errors import UnsupportedModelError
from mllmjax.loss import sequence_logprobs
from mllmjax.models import transformer
from mllmjax.models.gemma2 import GLOBAL, SLIDING
from mllmjax.sampling import Greedy, generate
from mllmjax.weights.table import params_from_hf

GEMMAS = ["gemma2", "gemma3"]


def _ours(model):
    cfg = models.from_hf_config({**model.config.to_dict(), "architectures": [type(model).__name__]})
    return cfg, params_from_hf(cfg, model.state_dict())


def _hf_greedy(model, prompt, max_new):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    ids = out.sequences[0, len(prompt) :].tolist()
    logps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, ids, strict=False)]
    return ids, logps


@pytest.mark.slow
@pytest.mark.parametrize("name", GEMMAS)
@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_greedy_matches_transformers_past_the_window(name, unroll):
    """32 greedy tokens from prompts shorter and longer than the 5-token window, batched together
    (left-padded), equal HF `generate`'s tokens, and their log-probs agree."""
    model = make_hf_model(name, seed=4, num_layers=4)
    cfg, params = _ours(model)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (1, 4, 9, 17)]
    ours = generate(params, cfg, prompts, Greedy(), max_new_tokens=32, unroll_layers=unroll)
    for prompt, got in zip(prompts, ours, strict=True):
        ids, logps = _hf_greedy(model, prompt, 32)
        assert got.ids == ids
        np.testing.assert_allclose(got.logprobs, logps, atol=1e-4, rtol=0)


def test_softcapped_loss_gradient_matches_autodiff():
    """The chunked log-probs with a final-logit soft-cap (and their written-out backward) equal
    log_softmax(c * tanh(h W^T / c) / T) and its autodiff gradient."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((40, 16)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 40, (2, 9)))
    weights = jnp.asarray(rng.standard_normal((2, 9)), jnp.float32)
    cap, temp = 3.0, 0.7

    def chunked(h, w):
        logp, _ = sequence_logprobs(
            h, w, tokens, completion_start=3, temperature=temp, chunk_size=4, softcap=cap
        )
        return (logp * weights).sum()

    def direct(h, w):
        logits = cap * jnp.tanh(jnp.einsum("btd,vd->btv", h, w) / cap) / temp
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 2:-1], -1), tokens[:, 3:, None], -1)[..., 0]
        return (logp * weights[:, 3:]).sum()

    np.testing.assert_allclose(chunked(hidden, head), direct(hidden, head), rtol=1e-5)
    for got, want in zip(
        jax.grad(chunked, (0, 1))(hidden, head), jax.grad(direct, (0, 1))(hidden, head), strict=True
    ):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", GEMMAS)
def test_export_round_trip_is_exact(name, tmp_path):
    from transformers import AutoModelForCausalLM

    model = save_hf_model(name, tmp_path / "hf")
    convert(str(tmp_path / "hf"), tmp_path / "ck")
    export(tmp_path / "ck", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert type(back) is type(model)
    original, exported = model.state_dict(), back.state_dict()
    assert original.keys() == exported.keys()
    for key in original:
        assert torch.equal(original[key], exported[key]), key


def test_gemma3_older_config_spelling():
    """Configs written before transformers 5 (rope_theta + rope_scaling for the global layers,
    rope_local_base_freq for the local ones, sliding_window_pattern) read like the new spelling."""
    old = dict(
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        rope_theta=1_000_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        rope_local_base_freq=10_000.0,
        sliding_window=512,
        sliding_window_pattern=6,
        query_pre_attn_scalar=16,
    )
    cfg = models.from_hf_config(old)
    assert cfg.layer_types == (SLIDING,) * 5 + (GLOBAL,) + (SLIDING,)
    assert (cfg.rope_theta, dict(cfg.rope_scaling)) == (1e6, {"rope_type": "linear", "factor": 8.0})
    assert (cfg.local_rope_theta, cfg.local_rope_scaling) == (10_000.0, None)
    assert cfg.tie_word_embeddings and cfg.final_logit_softcap is None


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3"), "vision"),
        (dict(hidden_activation="gelu"), "hidden_activation 'gelu'"),
        (dict(use_bidirectional_attention=True), "bidirectional"),
        (dict(layer_types=["sliding_attention", "chunked_attention"] * 2), "chunked_attention"),
    ],
)
def test_refusals_name_what_is_unsupported(change, message):
    hf = {**make_hf_model("gemma3").config.to_dict(), "architectures": ["Gemma3ForCausalLM"]}
    hf.update(change)
    with pytest.raises(UnsupportedModelError, match=message):
        models.from_hf_config(hf)


def test_windowed_layers_in_a_scan_equal_unrolled():
    """The scanned forward picks each layer's window and rope table by a traced layer index; the
    unrolled forward picks them in Python: both give the same logits."""
    cfg = models.tiny("gemma3", num_layers=3)
    params = transformer.init_params(cfg, jax.random.key(1))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 11)))
    pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
    scanned, _ = transformer.forward(params, cfg, tokens, pos)
    split = {**params, "layers": transformer.split_layers(params["layers"], cfg.num_layers)}
    unrolled, _ = transformer.forward(split, cfg, tokens, pos)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=0)
