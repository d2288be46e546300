"""Gemma 3 (text): the Gemma 2 layer with Gemma-RMSNorm on each head's query and key before RoPE,
and a RoPE base per layer type (local 10k on the sliding-window layers, global 1M with linear scaling
on the others); no soft-capping unless the config asks for it.

    x = embed(tokens) * sqrt(hidden)
    x = x + Norm(Attention(Norm(x)))     q = RoPE_t(Norm_q(x Wq)), k = RoPE_t(Norm_k(x Wk)), t = layer type
    x = x + Norm(GeGLU(Norm(x)))

HF's default layer pattern makes every sixth layer global. The multimodal checkpoints
(`Gemma3ForConditionalGeneration`) are this model behind a vision tower:
`mllmjax.models.vision.gemma3_vision`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mllmjax.models.blocks import rope as rope_lib
from mllmjax.models.blocks.rope import rope_tables
from mllmjax.models.cache import LayerKV
from mllmjax.models.config import tiny_fields
from mllmjax.models.gemma2 import GLOBAL, SLIDING, Gemma2Config, gemma_block, gemma_hf_names, read_gemma
from mllmjax.models.gemma2 import param_specs as gemma_param_specs
from mllmjax.models.layer import LayerContext
from mllmjax.models.params import Params, Rule

ARCHITECTURES = ("Gemma3ForCausalLM",)
MODEL_TYPES = ("gemma3_text",)
GGUF_ARCHITECTURE = "gemma3"

@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3Config(Gemma2Config):
    family: ClassVar[str] = "gemma3"
    rope_theta: float = 1_000_000.0  # the global layers' base; rope_scaling applies to them
    local_rope_theta: float = 10_000.0  # the sliding-window layers' base
    local_rope_scaling: rope_lib.RopeScaling | dict[str, Any] = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.local_rope_scaling, dict):
            object.__setattr__(self, "local_rope_scaling", tuple(sorted(self.local_rope_scaling.items())))
        rope_lib.check_scaling(self.local_rope_scaling)
        super().__post_init__()

    def param_specs(self) -> dict[str, Any]:
        return param_specs(self)

    def local_inv_freq(self) -> np.ndarray:
        return rope_lib.inv_freq(self.head_dim, self.local_rope_theta, self.local_rope_scaling)


Config = Gemma3Config


def config_from_hf(hf: dict[str, Any]) -> Gemma3Config:
    fields = read_gemma(hf, "gemma3")
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and SLIDING in params:  # transformers 5: one entry per layer type
        fields["rope_theta"], fields["rope_scaling"] = rope_lib.read_rope(hf, GLOBAL)
        local_theta, local_scaling = rope_lib.read_rope(hf, SLIDING)
    else:  # older configs: rope_theta/rope_scaling are the global layers', rope_local_base_freq the local
        fields["rope_theta"], fields["rope_scaling"] = rope_lib.read_rope(
            {**hf, "rope_theta": hf.get("rope_theta", 1_000_000.0)}
        )
        local_theta, local_scaling = float(hf.get("rope_local_base_freq", 10_000.0)), None
    return Gemma3Config(**fields, local_rope_theta=local_theta, local_rope_scaling=local_scaling)


def tiny(**overrides: Any) -> Gemma3Config:
    fields = tiny_fields(
        num_layers=3,
        sliding_window=4,
        query_pre_attn_scalar=24.0,
        tie_word_embeddings=True,
        layer_types=(SLIDING, GLOBAL, SLIDING),
    )
    return Gemma3Config(**{**fields, **overrides})


def param_specs(cfg: Gemma3Config) -> dict[str, Any]:
    return gemma_param_specs(cfg, qk_norm=True)


HF_NAMES = gemma_hf_names(
    Rule("model.layers.{i}.self_attn.q_norm.weight", "layers/q_norm"),
    Rule("model.layers.{i}.self_attn.k_norm.weight", "layers/k_norm"),
)


def rope(cfg: Gemma3Config, positions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """The rope tables of both layer types: {"global": (cos, sin), "local": (cos, sin)}."""
    return {
        "global": rope_tables(positions, jnp.asarray(cfg.inv_freq())),
        "local": rope_tables(positions, jnp.asarray(cfg.local_inv_freq())),
    }


def block(
    cfg: Gemma3Config, p: Params, x: jax.Array, kv: LayerKV | None, ctx: LayerContext
) -> tuple[jax.Array, LayerKV | None]:
    """One decoder layer on x [B, T, D]; kv: this layer's cache (None without one)."""
    cos_sin = ctx.select(cfg.sliding, ctx.rope["local"], ctx.rope["global"])
    return gemma_block(cfg, p, x, kv, ctx, cos_sin, qk_norm=True)
