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
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mllmjax.errors import UnsupportedModelError
from mllmjax.models import registry, transformer
from mllmjax.models.blocks.activations import ACTIVATIONS
from mllmjax.models.blocks.mlp import plain_mlp
from mllmjax.models.config import ModelConfig
from mllmjax.models.params import Params, ParamSpec, Rule
from mllmjax.models.vision import tower

# The shared machinery (`vlm`), under the names callers of this module have always used.
from mllmjax.models.vision.vlm import (  # noqa: F401
    PARTS,
    check_image_tokens,
    forward,
    hf_tensors_from_params,
    image_features,
    input_embeds,
    load_hf,
    logits,
    merge_image_features,
    merge_row_features,
    params_from_hf,
    part_of,
    prompt_embeds,
)

ARCHITECTURES = ("LlavaForConditionalGeneration",)
MODEL_TYPES = ("llava",)
# Text families whose HF model embeds tokens without a multiplier: the image features go in as they are.
TEXT_FAMILIES = ("llama", "qwen2")
STRATEGIES = ("default", "full")


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
    bidirectional_images: ClassVar[bool] = False  # image tokens attend causally, like text

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
