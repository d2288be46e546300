"""Qwen2 / Qwen2.5: the Llama layer with a bias on the q, k and v projections (none on o).

x = x + Attention(RMSNorm(x))      q = x Wq + bq, k = x Wk + bk, v = x Wv + bv
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
from mllmjax.models.params import QKV_BIAS_HF_NAMES, Params, ParamSpec, decoder_hf_names, decoder_specs

ARCHITECTURES = ("Qwen2ForCausalLM",)
MODEL_TYPES = ("qwen2",)
GGUF_ARCHITECTURE = "qwen2"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2Config(ModelConfig):
    family: ClassVar[str] = "qwen2"

    def param_specs(self) -> dict[str, Any]:
        return param_specs(self)


Config = Qwen2Config


def config_from_hf(hf: dict[str, Any]) -> Qwen2Config:
    refuse(hf, activation="silu")
    return Qwen2Config(**read_common(hf))


def tiny(**overrides: Any) -> Qwen2Config:
    return Qwen2Config(**tiny_fields(**overrides))


def param_specs(cfg: Qwen2Config) -> dict[str, Any]:
    d, h = cfg.hidden_size, cfg.head_dim
    layer: dict[str, ParamSpec] = {
        "attn_norm": ParamSpec((d,), ("norm",)),
        **projection_specs(d, cfg.num_heads, cfg.num_kv_heads, h),
        "mlp_norm": ParamSpec((d,), ("norm",)),
        **swiglu_specs(d, cfg.intermediate_size),
        **qkv_bias_specs(cfg.num_heads, cfg.num_kv_heads, h),
    }
    return decoder_specs(
        layer, vocab=cfg.vocab_size, embed=d, num_layers=cfg.num_layers, tied=cfg.tie_word_embeddings
    )


HF_NAMES = decoder_hf_names(*QKV_BIAS_HF_NAMES)


def rope(cfg: Qwen2Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    return rope_tables(positions, jnp.asarray(cfg.inv_freq()))


def block(
    cfg: Qwen2Config, p: Params, x: jax.Array, kv: LayerKV | None, ctx: LayerContext
) -> tuple[jax.Array, LayerKV | None]:
    """One decoder layer on x [B, T, D]; kv: this layer's cache (None without one)."""
    eps = cfg.rms_norm_eps
    h = rms_norm(x, p["attn_norm"], eps)
    q = project(h, p["q"]) + p["q_bias"]
    k = project(h, p["k"]) + p["k_bias"]
    v = project(h, p["v"]) + p["v_bias"]
    cos, sin = ctx.rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a, kv = ctx.attend(q, k, v, kv)
    x = x + project_out(a, p["o"])
    h = rms_norm(x, p["mlp_norm"], eps)
    return x + swiglu_mlp(h, p["gate"], p["up"], p["down"]), kv
