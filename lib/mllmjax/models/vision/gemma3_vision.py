"""Gemma 3 with vision (`Gemma3ForConditionalGeneration`): a SigLIP tower, a pooling projector with a
soft-embedding norm, and Gemma 3 text, whose image tokens see their whole image.

    f = tower(images).last_hidden_state                    [N, g*g, Dv], through SigLIP's post-norm
    f = avg_pool(f as a g x g grid, k x k)                 k = g / sqrt(mm_tokens_per_image)
    f = GemmaRMSNorm(f) @ W                                W [Dv, D_text] (mm_input_projection_weight)
    x = embed(ids) * sqrt(D_text); x[ids == image_token_id] = f
    logits = Gemma 3 text from x, image tokens attending to every token of their image

The processor writes each image as "\\n\\n<start_of_image>" + mm_tokens_per_image image tokens +
"<end_of_image>\\n\\n"; the image tokens of one image form one block that attends bidirectionally
(HF's `token_type_ids` mask: an image token sees up to its image's last token, `vlm.image_reach`),
still within its window on the sliding layers. The token embeddings are scaled before the image
features go in, which are not. Pan-and-scan crops are the processor's business (off by default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mllmjax.errors import UnsupportedModelError
from mllmjax.models import registry
from mllmjax.models.blocks.norms import gemma_rms_norm
from mllmjax.models.config import ModelConfig
from mllmjax.models.params import Params, ParamSpec, Rule
from mllmjax.models.vision import tower

# The loader and export every vision-language module shares (its projector table: PROJECTOR_HF_NAMES).
from mllmjax.models.vision.vlm import hf_tensors_from_params, params_from_hf  # noqa: F401

ARCHITECTURES = ("Gemma3ForConditionalGeneration",)
MODEL_TYPES = ("gemma3",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3ProjectorConfig:
    """The projector: average pooling (no params), a Gemma RMSNorm over the tower's width, one matrix."""

    family: ClassVar[str] = "gemma3_projector"  # its name in the loader's messages

    vision_size: int
    hidden_size: int  # the text model's
    eps: float = 1e-6  # the tower's layer_norm_eps, as HF builds the norm

    def param_specs(self) -> dict[str, Any]:
        return {
            "norm": ParamSpec((self.vision_size,), ("norm",)),
            "proj": ParamSpec((self.vision_size, self.hidden_size), ("mlp", "embed")),
        }


PROJECTOR_HF_NAMES: tuple[Rule, ...] = (
    Rule("mm_soft_emb_norm.weight", "norm"),
    Rule("mm_input_projection_weight", "proj"),  # stored [Dv, D_text], used as x @ W
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3VisionConfig:
    family: ClassVar[str] = "gemma3_vision"
    bidirectional_images: ClassVar[bool] = True

    vision: tower.VisionConfig
    projector: Gemma3ProjectorConfig
    text: ModelConfig
    image_token_id: int
    mm_tokens_per_image: int = 256
    boi_token_id: int = 255_999
    eoi_token_id: int = 256_000

    def __post_init__(self) -> None:
        if not isinstance(self.vision, tower.SiglipVisionConfig):
            raise UnsupportedModelError(f"a Gemma 3 vision tower must be SigLIP, got {self.vision.family}")
        if self.text.family != "gemma3":
            raise UnsupportedModelError(f"a Gemma 3 text model must be gemma3, got {self.text.family!r}")
        side = math.isqrt(self.mm_tokens_per_image)
        g = self.vision.grid
        if side < 1 or side * side != self.mm_tokens_per_image or g % side:
            raise UnsupportedModelError(
                f"mm_tokens_per_image {self.mm_tokens_per_image} must be a square whose side divides the "
                f"tower's {g} patches per side"
            )
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise UnsupportedModelError(
                f"image_token_index {self.image_token_id} is outside the vocabulary ({self.text.vocab_size})"
            )

    @property
    def tokens_per_image(self) -> int:
        return self.mm_tokens_per_image

    @property
    def pool(self) -> int:
        """The pooling kernel (and stride) over the tower's patch grid."""
        return self.vision.grid // math.isqrt(self.mm_tokens_per_image)

    def param_specs(self) -> dict[str, Any]:
        return param_specs(self)


Config = Gemma3VisionConfig


def config_from_hf(hf: dict[str, Any]) -> Gemma3VisionConfig:
    """The config of a Gemma 3 multimodal config.json dict; UnsupportedModelError on anything we would
    get wrong."""
    for key in ("vision_config", "text_config"):
        if not isinstance(hf.get(key), dict):
            raise UnsupportedModelError(f"a Gemma 3 multimodal config.json needs its {key}")
    vision = tower.config_from_hf({"model_type": "siglip_vision_model", **hf["vision_config"]})
    text = registry.from_hf_config({"model_type": "gemma3_text", **hf["text_config"]})
    if hf.get("tie_word_embeddings", True) and not text.tie_word_embeddings:
        text = dataclasses.replace(text, tie_word_embeddings=True)
    return Gemma3VisionConfig(
        vision=vision,
        projector=Gemma3ProjectorConfig(
            vision_size=vision.hidden_size, hidden_size=text.hidden_size, eps=vision.layer_norm_eps
        ),
        text=text,
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 262_144))),
        mm_tokens_per_image=int(hf.get("mm_tokens_per_image", 256)),
        boi_token_id=int(hf.get("boi_token_index", 255_999)),
        eoi_token_id=int(hf.get("eoi_token_index", 256_000)),
    )


def param_specs(cfg: Gemma3VisionConfig) -> dict[str, Any]:
    return {
        "vision": cfg.vision.param_specs(),
        "projector": cfg.projector.param_specs(),
        "text": cfg.text.param_specs(),
    }


def tower_features(vision: Params, cfg: Gemma3VisionConfig, pixels: jax.Array, dtype: Any) -> jax.Array:
    """What the projector reads [N, g*g, Dv] of images pixels [N, C, H, W]: the tower's
    last_hidden_state (all layers, then SigLIP's post-norm)."""
    hidden = tower.hidden_states(vision, cfg.vision, pixels, compute_dtype=dtype)
    return tower.last_hidden_state(cfg.vision, vision, hidden)


def project_features(projector: Params, cfg: Gemma3VisionConfig, feats: jax.Array, dtype: Any) -> jax.Array:
    """The projector on tower features [..., g*g, Dv] -> [..., mm_tokens_per_image, D_text]: the patch
    grid averaged over k x k squares (float32 sums), the norm, the matrix."""
    *lead, _, width = feats.shape
    g, k = cfg.vision.grid, cfg.pool
    side = g // k
    x = feats.reshape(-1, side, k, side, k, width).astype(jnp.float32).mean(axis=(2, 4)).astype(dtype)
    x = gemma_rms_norm(x.reshape(-1, side * side, width), projector["norm"], cfg.projector.eps)
    out = jnp.einsum("NPV,VD->NPD", x, projector["proj"].astype(dtype))
    return out.reshape(*lead, side * side, -1)
