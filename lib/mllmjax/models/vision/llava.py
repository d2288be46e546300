"""LLaVA (`LlavaForConditionalGeneration`): a vision tower, a two-layer projector into the text model's
embedding space, and a decoder-only text model that reads the projected image features in place of
its image tokens.

    f = concat over l of tower(images).hidden_states[l]    l: vision_feature_layer (an int or a list)
    f = f[:, 1:]                                            vision_feature_select_strategy "default"
    f = linear_2(act(linear_1(f)))                          act: projector_hidden_act
    x = embed(ids); x[ids == image_token_id] = f            in row-major order over the batch
    logits = text model from x

"default" drops each image's first token whatever the tower: CLIP's class token, but a patch of a
SigLIP tower (HF does the same; SigLIP checkpoints say "full"). The text model is one of the decoder
families (`TEXT_FAMILIES`) run from these embeddings (`transformer.forward(embeds=)`); its params
are what the family's own loader would give, under "text".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mllmjax.errors import BadInputError, UnsupportedModelError, WeightsError
from mllmjax.models import registry, transformer
from mllmjax.models.blocks.activations import ACTIVATIONS
from mllmjax.models.blocks.mlp import plain_mlp
from mllmjax.models.config import ModelConfig
from mllmjax.models.params import Params, ParamSpec, Rule
from mllmjax.models.vision import tower
from mllmjax.weights import table

ARCHITECTURES = ("LlavaForConditionalGeneration",)
MODEL_TYPES = ("llava",)
# Text families whose HF model embeds tokens without a multiplier: the image features go in as they are.
TEXT_FAMILIES = ("llama", "qwen2")
STRATEGIES = ("default", "full")
PARTS = ("vision", "projector", "text")  # the subtrees of the params


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProjectorConfig:
    """The multimodal projector: linear_1 [in_features, hidden_size], act, linear_2 [hidden_size,
    hidden_size], with biases or not; in_features is the tower's width times the feature layers."""

    family: ClassVar[str] = "llava_projector"  # its name in the loader's messages

    in_features: int
    hidden_size: int  # the text model's
    bias: bool = True
    act: str = "gelu"

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"projector_hidden_act {self.act!r} is not supported (only {', '.join(ACTIVATIONS)})"
            )

    def param_specs(self) -> dict[str, Any]:
        # Laid out like an MLP whose hidden width is the text model's: in through "mlp" back to "embed".
        d = self.hidden_size
        specs = {
            "fc1": ParamSpec((self.in_features, d), ("embed", "mlp")),
            "fc2": ParamSpec((d, d), ("mlp", "embed")),
        }
        if self.bias:
            specs.update(fc1_bias=ParamSpec((d,), ("mlp",)), fc2_bias=ParamSpec((d,), ("norm",)))
        return specs


PROJECTOR_HF_NAMES: tuple[Rule, ...] = (
    Rule("linear_1.weight", "fc1", "transpose"),
    Rule("linear_1.bias", "fc1_bias"),
    Rule("linear_2.weight", "fc2", "transpose"),
    Rule("linear_2.bias", "fc2_bias"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlavaConfig:
    """feature_layers: the tower's hidden states the projector reads, as non-negative indices (0: the
    first layer's input), concatenated in this order. select_strategy: HF's
    `vision_feature_select_strategy`."""

    family: ClassVar[str] = "llava"

    vision: tower.VisionConfig
    projector: ProjectorConfig
    text: ModelConfig
    image_token_id: int
    feature_layers: tuple[int, ...]
    select_strategy: str = "default"

    def __post_init__(self) -> None:
        if self.select_strategy not in STRATEGIES:
            raise UnsupportedModelError(
                f"vision_feature_select_strategy {self.select_strategy!r} is not supported "
                f"(only {', '.join(STRATEGIES)})"
            )
        if self.text.family not in TEXT_FAMILIES:
            raise UnsupportedModelError(
                f"a LLaVA text model of family {self.text.family!r} is not supported "
                f"(only {', '.join(TEXT_FAMILIES)})"
            )
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise UnsupportedModelError(
                f"image_token_id {self.image_token_id} is outside the vocabulary ({self.text.vocab_size})"
            )
        if not self.feature_layers:
            raise UnsupportedModelError("vision_feature_layer selects no layer")

    @property
    def tokens_per_image(self) -> int:
        """The image tokens a prompt holds per image: the tower's tokens, less the first by "default"."""
        return self.vision.num_positions - (self.select_strategy == "default")

    def param_specs(self) -> dict[str, Any]:
        return param_specs(self)


Config = LlavaConfig


def config_from_hf(hf: dict[str, Any]) -> LlavaConfig:
    """The config of a LLaVA config.json dict; UnsupportedModelError on anything we would get wrong."""
    for key in ("vision_config", "text_config"):
        if not isinstance(hf.get(key), dict):
            raise UnsupportedModelError(f"a LLaVA config.json needs its {key}")
    vision = tower.config_from_hf(hf["vision_config"])
    text = registry.from_hf_config(hf["text_config"])
    if hf.get("tie_word_embeddings") and not text.tie_word_embeddings:  # HF ties if either says so
        text = dataclasses.replace(text, tie_word_embeddings=True)
    layers = hf.get("vision_feature_layer", -2)
    layers = (layers,) if isinstance(layers, int) else tuple(layers)
    if not all(isinstance(layer, int) for layer in layers):
        raise UnsupportedModelError(
            f"vision_feature_layer {hf['vision_feature_layer']!r}: an int or a list of ints"
        )
    image_token = hf.get("image_token_index", hf.get("image_token_id", 32000))
    return LlavaConfig(
        vision=vision,
        projector=ProjectorConfig(
            in_features=vision.hidden_size * len(layers),
            hidden_size=text.hidden_size,
            bias=bool(hf.get("multimodal_projector_bias", True)),
            act=hf.get("projector_hidden_act", "gelu"),
        ),
        text=text,
        image_token_id=image_token,
        feature_layers=tuple(tower.feature_index(vision, layer) for layer in layers),
        select_strategy=hf.get("vision_feature_select_strategy", "default"),
    )


def param_specs(cfg: LlavaConfig) -> dict[str, Any]:
    return {
        "vision": cfg.vision.param_specs(),
        "projector": cfg.projector.param_specs(),
        "text": cfg.text.param_specs(),
    }


# Where each part of a LLaVA checkpoint lives, in the spellings its writers use (the original llava-hf
# checkpoints, transformers 4.52+, transformers 5): (prefix, part, the part's own name for the prefix).
_PARTS = (
    ("model.vision_tower.", "vision", ""),
    ("vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.language_model.", "text", "model."),
    ("language_model.model.", "text", "model."),
    ("language_model.lm_head.", "text", "lm_head."),
    ("lm_head.", "text", "lm_head."),
)


def part_of(name: str) -> tuple[str, str] | None:
    """(part, the tensor's name within the part's own model) of a LLaVA checkpoint tensor, or None:
    'language_model.model.layers.0.mlp.up_proj.weight' -> ('text', 'model.layers.0.mlp.up_proj.weight')."""
    for prefix, part, ours in _PARTS:
        if name.startswith(prefix):
            return part, ours + name[len(prefix) :]
    return None


def _in_part(part: str, name: str) -> str | None:
    found = part_of(name)
    return found[1] if found is not None and found[0] == part else None


def params_from_hf(
    cfg: LlavaConfig,
    source: Any,
    *,
    dtype: Any = np.float32,
    shardings: Params | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> Params:
    """{"vision", "projector", "text"} params from a LLaVA checkpoint's HF-named tensors (a WeightSource
    or a name -> array mapping): each part through its own name table, on a view of the source that
    names its tensors as the part's own model does (`mllmjax.weights.table.Renamed`). shardings: a
    tree shaped like the params, or None. A tensor outside the three parts is a WeightsError."""
    names = list(source) if isinstance(source, Mapping) else source.tensor_names()
    stray = [n for n in names if part_of(n) is None]
    if stray:
        raise WeightsError(
            f"unexpected tensor {stray[0]!r} in a LLaVA checkpoint (not in its vision tower, projector "
            "or language model)"
        )
    shardings = shardings or {}
    options = dict(dtype=dtype, on_tensor=on_tensor)
    view = {part: table.Renamed(source, functools.partial(_in_part, part)) for part in PARTS}
    return {
        "vision": tower.params_from_hf(
            cfg.vision, view["vision"], shardings=shardings.get("vision"), **options
        ),
        "projector": table.params_from_hf(
            cfg.projector,
            view["projector"],
            rules=PROJECTOR_HF_NAMES,
            shardings=shardings.get("projector"),
            **options,
        ),
        "text": table.params_from_hf(cfg.text, view["text"], shardings=shardings.get("text"), **options),
    }


# Export writes the original llava-hf checkpoints' names, which every transformers version loads
# (transformers 5's save_pretrained drops the tower's `vision_model.`, which older versions need):
# part -> (the prefix in the part's own names, the prefix written).
_SAVED = {
    "vision": (("", "vision_tower.vision_model."),),
    "projector": (("", "multi_modal_projector."),),
    "text": (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
}


def hf_tensors_from_params(
    cfg: LlavaConfig, params: Params, dtype: Any = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array in HF layout) of every tensor of a LLaVA checkpoint, for export: each part
    through its own table (the text model's without a tied head, which HF ties again), under the
    names `_SAVED` gives."""
    parts = (
        ("vision", cfg.vision, tower.HF_NAMES),
        ("projector", cfg.projector, PROJECTOR_HF_NAMES),
        ("text", cfg.text, None),
    )
    for part, part_cfg, rules in parts:
        for name, arr in table.hf_tensors_from_params(part_cfg, params[part], dtype, rules=rules):
            ours, saved = next((o, s) for o, s in _SAVED[part] if name.startswith(o))
            yield saved + name[len(ours) :], arr


def load_hf(folder: str | Path, *, dtype: Any = np.float32) -> tuple[LlavaConfig, Params]:
    """The config and params of an HF LLaVA folder (as `save_pretrained` writes it)."""
    from mllmjax.weights.hf import open_hf_folder

    source = open_hf_folder(Path(folder))
    try:
        cfg = config_from_hf(source.hf_config())
        return cfg, params_from_hf(cfg, source, dtype=dtype)
    finally:
        source.close()


def image_features(params: Params, cfg: LlavaConfig, pixels: jax.Array, dtype: Any) -> jax.Array:
    """The projected features [N, tokens_per_image, D_text] of images pixels [N, C, H, W]: the tower's
    features (`tower_features`) through the projector (`project_features`)."""
    return project_features(
        params["projector"], cfg, tower_features(params["vision"], cfg, pixels, dtype), dtype
    )


def tower_features(vision: Params, cfg: LlavaConfig, pixels: jax.Array, dtype: Any) -> jax.Array:
    """What the projector reads [N, tokens_per_image, in_features] of images pixels [N, C, H, W]: the
    selected hidden states of the tower (run only as deep as the deepest of them), concatenated, the
    first token dropped by "default". Training with a frozen tower computes these once per batch."""
    hidden = tower.hidden_states(
        vision, cfg.vision, pixels, depth=max(cfg.feature_layers), compute_dtype=dtype
    )
    feats = jnp.concatenate([hidden[layer] for layer in cfg.feature_layers], axis=-1)
    return feats[:, 1:] if cfg.select_strategy == "default" else feats


def project_features(projector: Params, cfg: LlavaConfig, feats: jax.Array, dtype: Any) -> jax.Array:
    """The projector on tower features [..., in_features] -> [..., D_text]."""
    p = transformer.cast_layer(projector, dtype)
    return plain_mlp(
        feats.astype(dtype), p["fc1"], p.get("fc1_bias"), p["fc2"], p.get("fc2_bias"), cfg.projector.act
    )


def merge_image_features(
    embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_token_id: int
) -> jax.Array:
    """embeds [B, T, D] with its image tokens' rows replaced by the image features [N, P, D]: the k-th
    image token of the batch, counted row by row, takes the k-th feature row (HF's masked_scatter), so
    image n fills the n-th run of P image tokens. The count must match (`check_image_tokens`)."""
    mask = input_ids == image_token_id
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    index = jnp.cumsum(mask.reshape(-1)).reshape(mask.shape) - 1
    picked = jnp.take(flat, jnp.clip(index, 0, flat.shape[0] - 1), axis=0)
    return jnp.where(mask[..., None], picked, embeds)


def merge_row_features(
    embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_token_id: int, prompt_len: int
) -> jax.Array:
    """`merge_image_features` row by row, for training batches whose rows are shuffled: embeds [B, T,
    D], input_ids [B, T], features [B, K, P, D] (row b's images, padded with unused ones to K). Only
    image tokens before column prompt_len are slots (a sampled completion may hold the image token's
    id, which the sampler embedded as a token); row b's k-th slot takes row b's k-th feature row."""
    b, t = input_ids.shape
    mask = (input_ids == image_token_id) & (jnp.arange(t) < prompt_len)[None, :]
    flat = features.reshape(b, -1, features.shape[-1]).astype(embeds.dtype)
    index = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, flat.shape[1] - 1)
    picked = jnp.take_along_axis(flat, index[..., None], axis=1)
    return jnp.where(mask[..., None], picked, embeds)


def check_image_tokens(cfg: LlavaConfig, input_ids: Any, num_images: int) -> None:
    """BadInputError unless the prompts hold exactly the image tokens the images fill (read on the
    host: the jitted forward cannot raise on what the ids hold)."""
    count = int((np.asarray(input_ids) == cfg.image_token_id).sum())
    want = num_images * cfg.tokens_per_image
    if count != want:
        raise BadInputError(
            f"the prompts hold {count} image tokens (id {cfg.image_token_id}), but {num_images} images "
            f"fill {want} ({cfg.tokens_per_image} each)"
        )


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def forward(
    params: Params,
    cfg: LlavaConfig,
    input_ids: jax.Array,
    positions: jax.Array,
    pixels: jax.Array | None = None,
    *,
    valid: jax.Array | None = None,
    compute_dtype: Any = None,
) -> jax.Array:
    """The text model's final-normed hidden states [B, T, D] of prompts input_ids [B, T] whose image
    tokens take the features of images pixels [N, C, H, W] (None: text only); positions, valid: as
    `transformer.forward` takes them. The image tokens are not counted here (`check_image_tokens`)."""
    text = params["text"]
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else text["embed"].dtype
    x = input_embeds(params, cfg, input_ids, pixels, compute_dtype=dtype)
    hidden, _ = transformer.forward(
        text, cfg.text, None, positions, embeds=x, valid=valid, compute_dtype=dtype
    )
    return hidden


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def input_embeds(
    params: Params,
    cfg: LlavaConfig,
    input_ids: jax.Array,
    pixels: jax.Array | None = None,
    *,
    compute_dtype: Any = None,
) -> jax.Array:
    """The text model's input embeddings [B, T, D] of prompts input_ids [B, T]: the token embeddings
    with the features of images pixels [N, C, H, W] (None: text only) at the image tokens."""
    text = params["text"]
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else text["embed"].dtype
    x = transformer.embed_tokens(text, cfg.text, input_ids, dtype)
    if pixels is not None:
        features = image_features(params, cfg, pixels, dtype)
        x = merge_image_features(x, input_ids, features, cfg.image_token_id)
    return x


def prompt_embeds(params: Params, cfg: LlavaConfig, ids: Any, pixels: Any = None) -> jax.Array:
    """One prompt's input embeddings [T, D] for the sampler (`sampling.generate_embeds`): ids [T] with
    its image tokens, pixels [N, C, H, W] their images (or None), the tower run once for them. The
    image tokens are checked on the host first; the ids are padded to a prompt bucket so prompts of
    similar length share one compiled program."""
    from mllmjax.sampling.buckets import prompt_bucket

    ids = np.asarray(ids, np.int32).reshape(-1)
    check_image_tokens(cfg, ids, 0 if pixels is None else len(pixels))
    padded = np.full((1, prompt_bucket(len(ids))), int(cfg.image_token_id == 0), np.int32)  # no image token
    padded[0, : len(ids)] = ids
    pixels = None if pixels is None or len(pixels) == 0 else jnp.asarray(pixels)
    return input_embeds(params, cfg, padded, pixels)[0, : len(ids)]


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def _logits(
    params: Params,
    cfg: LlavaConfig,
    input_ids: jax.Array,
    positions: jax.Array,
    pixels: jax.Array | None,
    valid: jax.Array | None,
    compute_dtype: Any,
) -> jax.Array:
    hidden = forward(params, cfg, input_ids, positions, pixels, valid=valid, compute_dtype=compute_dtype)
    return transformer.logits_from_hidden(params["text"], hidden, softcap=cfg.text.final_logit_softcap)


def logits(
    params: Params,
    cfg: LlavaConfig,
    input_ids: Any,
    pixels: Any = None,
    positions: Any = None,
    valid: Any = None,
    compute_dtype: Any = None,
) -> jax.Array:
    """Full-sequence float32 logits [B, T, V] of prompts with images (see `forward`; positions default
    to 0..T-1). Checks the image tokens on the host first, so it is not for use under a trace."""
    check_image_tokens(cfg, input_ids, 0 if pixels is None else pixels.shape[0])
    if positions is None:
        shape = np.shape(input_ids)
        positions = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)
    return _logits(params, cfg, input_ids, positions, pixels, valid, compute_dtype)
