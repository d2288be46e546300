"""Vision towers and LLaVA against HF transformers (torch, float32), on tiny random models: every hidden
state of CLIP and SigLIP towers, and LLaVA logits through the real path (save_pretrained -> our
loader -> forward) for a batch of prompts with images, one of them left-padded."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from hf_models import IMAGE_TOKEN, LLAVAS, make_llava
from hf_models import LLAVA_VOCAB as VOCAB
from hf_models import VISION_TOWERS as TOWERS
from hf_models import randomise as _randomise
from hf_models import tower_config as _tower_config

from mllmjax.errors import BadInputError, UnsupportedModelError, WeightsError
from mllmjax.models import registry, transformer
from mllmjax.models.vision import llava, tower
from mllmjax.weights.table import hf_tensors_from_params

TOWER_TOL = 1e-5
TOL = 1e-4


def _pixels(cfg: tower.VisionConfig, n: int, seed: int) -> np.ndarray:
    size = (n, cfg.num_channels, cfg.image_size, cfg.image_size)
    return np.random.default_rng(seed).standard_normal(size).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_tower_hidden_states_match_hf(kind):
    hf_cfg = _tower_config(kind)
    model_cls = transformers.CLIPVisionModel if kind == "clip" else transformers.SiglipVisionModel
    torch.manual_seed(0)
    model = _randomise(model_cls(hf_cfg), 1)
    cfg = tower.config_from_hf(hf_cfg.to_dict())
    params = tower.params_from_hf(cfg, model.state_dict())
    pixels = _pixels(cfg, 2, 2)

    ours = np.asarray(tower.hidden_states(params, cfg, pixels))
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(pixels), output_hidden_states=True)
    ref = np.stack([h.numpy() for h in out.hidden_states])
    assert ours.shape == ref.shape == (4, 2, cfg.num_positions, 40)
    assert np.abs(ours - ref).max() <= TOWER_TOL
    last = np.asarray(tower.last_hidden_state(cfg, params, ours))
    assert np.abs(last - out.last_hidden_state.numpy()).max() <= TOWER_TOL
    # Running fewer layers gives the first hidden states; the table exports what it loaded.
    assert np.array_equal(np.asarray(tower.hidden_states(params, cfg, pixels, depth=1)), ours[:2])
    # Every tensor, the pooled output's (not run) included, goes back as it came.
    state = model.state_dict()
    exported = dict(hf_tensors_from_params(cfg, params, rules=tower.HF_NAMES))
    assert exported.keys() == state.keys()
    for name, value in exported.items():
        assert np.array_equal(value, state[name].numpy()), name


def test_siglip_tower_without_its_pooling_head():
    """vision_use_head false: no head params; the tensors the tower has load and export back."""
    hf_cfg = _tower_config("siglip")
    hf_cfg.vision_use_head = False
    torch.manual_seed(0)
    model = _randomise(transformers.SiglipVisionModel(hf_cfg), 1)
    cfg = tower.config_from_hf(hf_cfg.to_dict())
    assert not cfg.use_head and "head" not in cfg.param_specs()
    params = tower.params_from_hf(cfg, model.state_dict())
    assert dict(hf_tensors_from_params(cfg, params, rules=tower.HF_NAMES)).keys() == model.state_dict().keys()


@pytest.fixture(scope="module", params=sorted(LLAVAS))
def saved_llava(request, tmp_path_factory):
    """(HF model, our config, our params loaded from its save_pretrained folder)."""
    model = make_llava(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    cfg, params = llava.load_hf(folder)
    return model, cfg, params


def _prompts(cfg: llava.LlavaConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two prompts of text, a run of image tokens and text; the second is shorter and left-padded.
    Returns (input_ids [2, T], attention mask [2, T])."""
    rng = np.random.default_rng(seed)
    image = [IMAGE_TOKEN] * cfg.tokens_per_image
    rows = [
        [*rng.integers(0, IMAGE_TOKEN, 5), *image, *rng.integers(0, IMAGE_TOKEN, 4)],
        [*rng.integers(0, IMAGE_TOKEN, 2), *image, *rng.integers(0, IMAGE_TOKEN, 3)],
    ]
    width = max(map(len, rows))
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def test_llava_logits_match_hf(saved_llava):
    model, cfg, params = saved_llava
    ids, mask = _prompts(cfg, 3)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    pixels = _pixels(cfg.vision, 2, 4)
    ours = np.asarray(llava.logits(params, cfg, ids, pixels, positions, valid=mask.astype(bool)))
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pixels),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= TOL


def test_llava_config_reads_hf(saved_llava):
    model, cfg, params = saved_llava
    hf = model.config
    assert cfg.image_token_id == IMAGE_TOKEN
    assert cfg.text.tie_word_embeddings == hf.text_config.tie_word_embeddings
    assert ("lm_head" in params["text"]) == (not hf.text_config.tie_word_embeddings)
    assert ("fc1_bias" in params["projector"]) == hf.multimodal_projector_bias
    assert max(cfg.feature_layers) <= cfg.vision.num_layers


def test_every_checkpoint_spelling_loads_the_same(saved_llava):
    """transformers 5 saves the original llava-hf names (what the fixture loaded); its state_dict and
    transformers 4.52+ checkpoints put the parts under `model.`, the latter with `vision_model.`."""
    model, cfg, params = saved_llava
    state = model.state_dict()
    assert any(n.startswith("model.vision_tower.") for n in state)
    v452 = {n.replace("model.vision_tower.", "model.vision_tower.vision_model."): t for n, t in state.items()}
    for spelling in (state, v452):
        loaded = llava.params_from_hf(cfg, spelling)
        assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), loaded, params))
    with pytest.raises(WeightsError, match="unexpected tensor"):
        llava.params_from_hf(cfg, {**state, "model.extra.weight": torch.zeros(1)})


def test_image_token_count_is_checked(saved_llava):
    _, cfg, params = saved_llava
    ids, _ = _prompts(cfg, 5)
    with pytest.raises(BadInputError, match="image tokens"):
        llava.logits(params, cfg, ids, _pixels(cfg.vision, 1, 6))


def test_embeds_run_what_tokens_run():
    """transformer.forward from `embed_tokens`' embeddings == from the tokens, for a family with an
    embedding multiplier (Gemma 2), which `embed_tokens` applies and `embeds=` does not again."""
    cfg = registry.tiny("gemma2")
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 9))
    embeds = transformer.embed_tokens(params, cfg, tokens, params["embed"].dtype)
    np.testing.assert_array_equal(
        np.asarray(transformer.logits(params, cfg, None, embeds=embeds)),
        np.asarray(transformer.logits(params, cfg, tokens)),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"image_size": [30, 40]}, "square"),
        ({"num_attention_heads": 3}, "multiple"),
        ({"model_type": "siglip2_vision_model"}, "not supported"),
    ],
)
def test_tower_config_refuses(change, message):
    hf = {**_tower_config("clip").to_dict(), **change}
    with pytest.raises(UnsupportedModelError, match=message):
        tower.config_from_hf(hf)


def test_llava_config_refuses():
    base = transformers.LlavaConfig(
        vision_config=_tower_config("clip"),
        text_config=transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1
        ),
        image_token_id=IMAGE_TOKEN,
    ).to_dict()
    llava.config_from_hf(base)
    cases = [
        ({"vision_feature_select_strategy": "cls"}, "select_strategy"),
        ({"vision_feature_layer": 4}, "out of range"),
        ({"image_token_index": VOCAB}, "outside the vocabulary"),
        ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
        ({"text_config": {**base["text_config"], "model_type": "qwen3"}}, "family"),
    ]
    for change, message in cases:
        with pytest.raises(UnsupportedModelError, match=message):
            llava.config_from_hf({**base, **change})
