"""Full-model parity against HF transformers (torch, float32) on tiny random configs of each family,
through the real path: save_pretrained -> mllmjax convert -> load_checkpoint -> forward."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from hf_models import TINY_CONFIGS, save_hf_model

from mllmjax.checkpoint import load_checkpoint
from mllmjax.convert import convert
from mllmjax.models import transformer
from mllmjax.models.blocks.cpu import OutMajor
from mllmjax.models.cache import init_cache
from mllmjax.weights.table import params_from_hf

TOL = 1e-4


# The cache and padding tests exercise shared code; one config per family keeps CI time down.
FAMILY_CONFIGS = ["llama-linear-rope-bias", "qwen2", "qwen3", "gemma2", "gemma3"]
_converted: dict[str, tuple] = {}


def _convert(name, tmp_path_factory):
    if name not in _converted:
        folder = tmp_path_factory.mktemp(name)
        model = save_hf_model(name, folder / "hf")
        convert(str(folder / "hf"), folder / "ckpt")
        _converted[name] = (name, model, load_checkpoint(folder / "ckpt"))
    return _converted[name]


@pytest.fixture(params=sorted(TINY_CONFIGS))
def converted(request, tmp_path_factory):
    return _convert(request.param, tmp_path_factory)


@pytest.fixture(params=FAMILY_CONFIGS)
def family(request, tmp_path_factory):
    return _convert(request.param, tmp_path_factory)


def test_logits_match_hf(converted):
    _, model, ckpt = converted
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 37))
    ours = np.asarray(transformer.logits(ckpt.params, ckpt.cfg, tokens))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - ref).max() <= TOL


def test_tied_source_stays_tied(converted):
    name, model, ckpt = converted
    assert ckpt.cfg.tie_word_embeddings == model.config.tie_word_embeddings
    assert ("lm_head" in ckpt.params) == (not model.config.tie_word_embeddings)


def test_left_padded_rows_compute_what_unpadded_rows_do(family):
    """A padded row (padding masked, positions from 0 at the first real token) gives the unpadded logits."""
    _, model, ckpt = family
    rng = np.random.default_rng(1)
    lengths = [11, 7, 3]
    width = max(lengths)
    tokens = np.zeros((3, width), np.int32)
    positions = np.zeros((3, width), np.int32)
    valid = np.zeros((3, width), bool)
    rows = [rng.integers(0, model.config.vocab_size, n) for n in lengths]
    for i, row in enumerate(rows):
        tokens[i, width - len(row) :] = row
        positions[i, width - len(row) :] = np.arange(len(row))
        valid[i, width - len(row) :] = True
    padded = np.asarray(transformer.logits(ckpt.params, ckpt.cfg, tokens, positions, valid=valid))
    for i, row in enumerate(rows):
        alone = np.asarray(transformer.logits(ckpt.params, ckpt.cfg, row[None]))[0]
        np.testing.assert_allclose(padded[i, width - len(row) :], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cpu_decode", [False, True], ids=["stacked", "out-major"])
def test_cached_prefill_and_decode_match_full_forward(family, cpu_decode):
    """Prefill then one token at a time through the cache == the full forward. cpu_decode: the decode
    steps take the CPU sampler's form (per-layer cache, `OutMajor` layer matrices, head-first logits).
    Windowed families get a per-layer cache either way, with ring buffers of the window (5 < 12 here)
    in their sliding layers (tests/models/test_ring_cache.py tests those further)."""
    _, model, ckpt = family
    cfg = ckpt.cfg
    tokens = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 20))
    full = np.asarray(transformer.logits(ckpt.params, cfg, tokens))
    cache = init_cache(cfg, 2, 32, per_layer=cpu_decode)
    assert (cache.ring_pos is not None) == any(w is not None for w in cfg.layer_windows())
    pos = np.broadcast_to(np.arange(12), (2, 12))
    hidden, cache = transformer.forward(ckpt.params, cfg, tokens[:, :12], pos, cache=cache)
    cap = cfg.final_logit_softcap
    steps = [np.asarray(transformer.logits_from_hidden(ckpt.params, hidden, softcap=cap))]
    params = ckpt.params
    if cpu_decode:  # the sampler's per-layer, output-major params
        params = transformer.out_major_layers(params, cfg)
        assert isinstance(params["layers"][0]["q"], OutMajor)
    for t in range(12, 20):
        hidden, cache = transformer.forward(
            params, cfg, tokens[:, t : t + 1], np.full((2, 1), t), cache=cache
        )
        steps.append(
            np.asarray(transformer.logits_from_hidden(params, hidden, head_first=cpu_decode, softcap=cap))
        )
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=TOL, rtol=0)


def test_parameter_gradients_match_torch_autograd(family):
    """Every parameter's gradient of a linear function of the logits equals torch's: checks the
    hand-written backwards of `blocks.cpu.dense` (both weight-gradient orders: wide and narrow outputs)
    and of `blocks.mlp.swiglu`."""
    _, model, ckpt = family
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, model.config.vocab_size, (2, 13))
    weights = rng.standard_normal((2, 13, model.config.vocab_size)).astype(np.float32)

    def ours(params):
        return (transformer.logits(params, ckpt.cfg, tokens) * weights).sum()

    grads = jax.grad(ours)(ckpt.params)
    model.zero_grad()
    (model(torch.tensor(tokens)).logits * torch.tensor(weights)).sum().backward()
    ref = params_from_hf(ckpt.cfg, {n: p.grad for n, p in model.named_parameters()})
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = np.asarray(flat_ref[path])
        assert np.abs(np.asarray(g) - r).max() <= TOL * max(1.0, np.abs(r).max()), jax.tree_util.keystr(path)
