"""Vision towers, LLaVA and Gemma 3 with vision against HF transformers (torch, float32), on tiny random
models: every hidden state of CLIP and SigLIP towers, and the vision-language models' logits through
the real path (save_pretrained -> our loader -> forward) for a batch of prompts with images, one of
them left-padded (Gemma 3's image tokens attending to their whole image, as HF's mask has them)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from hf_models import IMAGE_TOKEN, VLMS, make_llava
from hf_models import LLAVA_VOCAB as VOCAB
from hf_models import VISION_TOWERS as TOWERS
from hf_models import randomise as _randomise
from hf_models import tower_config as _tower_config

from mllmjax.errors import BadInputError, UnsupportedModelError, WeightsError
from mllmjax.models import registry, transformer
from mllmjax.models.vision import gemma3_vision, llava, tower, vlm
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


@pytest.fixture(scope="module", params=sorted(VLMS))
def saved_llava(request, tmp_path_factory):
    """(HF model, our config, our params loaded from its save_pretrained folder)."""
    model = make_llava(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    cfg, params = vlm.load_hf(folder)
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
    ours = np.asarray(vlm.logits(params, cfg, ids, pixels, positions, valid=mask.astype(bool)))
    inputs = dict(
        input_ids=torch.tensor(ids),
        pixel_values=torch.tensor(pixels),
        attention_mask=torch.tensor(mask),
        position_ids=torch.tensor(positions),
    )
    gemma = cfg.bidirectional_images
    with torch.no_grad():
        # Gemma 3's processor marks the image tokens (token_type_ids 1), which opens their mask
        types = dict(token_type_ids=torch.tensor(ids == IMAGE_TOKEN, dtype=torch.long)) if gemma else {}
        ref = model(**inputs, **types).logits.numpy()
        causal = model(**inputs).logits.numpy() if gemma else None
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= TOL
    if gemma:  # the bidirectional image blocks change what follows them: the test sees the mask
        assert np.abs(causal[real] - ref[real]).max() > 100 * TOL


def test_llava_config_reads_hf(saved_llava):
    model, cfg, params = saved_llava
    hf = model.config
    assert cfg.image_token_id == IMAGE_TOKEN
    assert cfg.text.tie_word_embeddings == hf.text_config.tie_word_embeddings
    assert ("lm_head" in params["text"]) == (not hf.text_config.tie_word_embeddings)
    if cfg.family == "gemma3_vision":
        assert (cfg.tokens_per_image, cfg.pool, cfg.vision.grid) == (16, 2, 8)
        assert (cfg.boi_token_id, cfg.eoi_token_id) == (hf.boi_token_index, hf.eoi_token_index)
        return
    assert ("fc1_bias" in params["projector"]) == hf.multimodal_projector_bias
    assert max(cfg.feature_layers) <= cfg.vision.num_layers


def test_every_checkpoint_spelling_loads_the_same(saved_llava):
    """transformers 5 saves the original llava-hf names (what the fixture loaded); its state_dict and
    transformers 4.52+ checkpoints put the parts under `model.`, the latter with `vision_model.`."""
    model, cfg, params = saved_llava
    state = model.state_dict()
    assert any(n.startswith("model.vision_tower.") for n in state)
    v452 = {n.replace("model.vision_tower.", "model.vision_tower.vision_model."): t for n, t in state.items()}
    load = vlm.module(cfg).params_from_hf
    for spelling in (state, v452):
        loaded = load(cfg, spelling)
        assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), loaded, params))
    with pytest.raises(WeightsError, match="unexpected tensor"):
        load(cfg, {**state, "model.extra.weight": torch.zeros(1)})


def test_image_token_count_is_checked(saved_llava):
    _, cfg, params = saved_llava
    ids, _ = _prompts(cfg, 5)
    with pytest.raises(BadInputError, match="image tokens"):
        vlm.logits(params, cfg, ids, _pixels(cfg.vision, 1, 6))


def test_image_reach_spans_each_run_of_image_tokens():
    """Hand-computed: left padding, two images of 2 and 3 tokens, an image token in the completion
    (after prompt_len) that stays a causal token."""
    cfg = type("Cfg", (), dict(bidirectional_images=True, image_token_id=9))()
    ids = np.array([[0, 0, 5, 9, 9, 6, 9, 9, 9, 7, 9]])
    positions = np.array([[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    reach = np.asarray(vlm.image_reach(cfg, ids, positions, prompt_len=10))
    np.testing.assert_array_equal(reach, [[0, 0, 0, 2, 2, 3, 6, 6, 6, 7, 8]])
    np.testing.assert_array_equal(vlm.prompt_reach(cfg, [9, 9, 4, 9]), [1, 1, 2, 3])
    cfg.bidirectional_images = False
    assert vlm.image_reach(cfg, ids, positions) is None and vlm.prompt_reach(cfg, [9]) is None


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


def test_gemma3_vision_config_refuses():
    from hf_models import make_gemma3_vision

    base = make_gemma3_vision().config.to_dict()
    assert gemma3_vision.config_from_hf(base).tokens_per_image == 16
    cases = [
        ({"mm_tokens_per_image": 12}, "square"),
        ({"mm_tokens_per_image": 9}, "divides"),
        ({"image_token_index": VOCAB}, "outside the vocabulary"),
        ({"vision_config": {**base["vision_config"], "model_type": "clip_vision_model"}}, "SigLIP"),
    ]
    for change, message in cases:
        with pytest.raises(UnsupportedModelError, match=message):
            gemma3_vision.config_from_hf({**base, **change})
