"""Llama (Llama 2/3, SmolLM2): pre-norm decoder layers of grouped-query attention with rotary
positions and a SwiGLU MLP, RMSNorm throughout.

    x = x + Attention(RMSNorm(x))      q, k, v and o carry a bias only with `attention_bias`
    x = x + SwiGLU(RMSNorm(x))
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mllmjax.models.blocks.attention import projection_specs, qkv_bias_specs
from mllmjax.models.blocks.linear import project, project_out
from mllmjax.models.blocks.mlp import swiglu_mlp, swiglu_specs
from mllmjax.models.blocks.norms import rms_norm
from mllmjax.models.blocks.rope import apply_rope, rope_tables
from mllmjax.models.cache import LayerKV
from mllmjax.models.config import ModelConfig, read_common, refuse, tiny_fields
from mllmjax.models.layer import LayerContext
from mllmjax.models.params import QKV_BIAS_HF_NAMES, Params, ParamSpec, Rule, decoder_hf_names, decoder_specs

ARCHITECTURES = ("LlamaForCausalLM",)
MODEL_TYPES = ("llama",)
GGUF_ARCHITECTURE = "llama"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
    family: ClassVar[str] = "llama"
    attention_bias: bool = False  # q, k, v and o projections with biases

    def param_specs(self) -> dict[str, Any]:
        return param_specs(self)

    @classmethod
    def smollm2_135m(cls) -> LlamaConfig:
        return cls(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        )


Config = LlamaConfig


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    refuse(hf, activation="silu")
    return LlamaConfig(**read_common(hf), attention_bias=bool(hf.get("attention_bias", False)))


def tiny(**overrides: Any) -> LlamaConfig:
    return LlamaConfig(**tiny_fields(**{"tie_word_embeddings": True, **overrides}))


def param_specs(cfg: LlamaConfig) -> dict[str, Any]:
    d, h = cfg.hidden_size, cfg.head_dim
    layer: dict[str, ParamSpec] = {
        "attn_norm": ParamSpec((d,), ("norm",)),
        **projection_specs(d, cfg.num_heads, cfg.num_kv_heads, h),
        "mlp_norm": ParamSpec((d,), ("norm",)),
        **swiglu_specs(d, cfg.intermediate_size),
    }
    if cfg.attention_bias:
        layer.update(qkv_bias_specs(cfg.num_heads, cfg.num_kv_heads, h))
        layer["o_bias"] = ParamSpec((d,), ("norm",))
    return decoder_specs(
        layer, vocab=cfg.vocab_size, embed=d, num_layers=cfg.num_layers, tied=cfg.tie_word_embeddings
    )


HF_NAMES = decoder_hf_names(
    *QKV_BIAS_HF_NAMES, Rule("model.layers.{i}.self_attn.o_proj.bias", "layers/o_bias")
)


def rope(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    return rope_tables(positions, jnp.asarray(cfg.inv_freq()))


def block(
    cfg: LlamaConfig, p: Params, x: jax.Array, kv: LayerKV | None, ctx: LayerContext
) -> tuple[jax.Array, LayerKV | None]:
    """One decoder layer on x [B, T, D]; kv: this layer's cache (None without one)."""
    eps = cfg.rms_norm_eps
    h = rms_norm(x, p["attn_norm"], eps)
    q, k, v = project(h, p["q"]), project(h, p["k"]), project(h, p["v"])
    if cfg.attention_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    cos, sin = ctx.rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a, kv = ctx.attend(q, k, v, kv)
    o = project_out(a, p["o"])
    if cfg.attention_bias:
        o = o + p["o_bias"]
    x = x + o
    h = rms_norm(x, p["mlp_norm"], eps)
    return x + swiglu_mlp(h, p["gate"], p["up"], p["down"]), kv
