"""Qwen3 (dense): the Llama layer with RMSNorm on each head's query and key before RoPE, and a
head_dim that need not be hidden_size / num_heads.

    x = x + Attention(RMSNorm(x))      q = RoPE(RMSNorm_q(x Wq)), k = RoPE(RMSNorm_k(x Wk)) per head
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

ARCHITECTURES = ("Qwen3ForCausalLM",)
MODEL_TYPES = ("qwen3",)
GGUF_ARCHITECTURE = "qwen3"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3Config(ModelConfig):
    family: ClassVar[str] = "qwen3"
    attention_bias: bool = False  # q, k, v and o projections with biases

    def param_specs(self) -> dict[str, Any]:
        return param_specs(self)


Config = Qwen3Config


def config_from_hf(hf: dict[str, Any]) -> Qwen3Config:
    refuse(hf, activation="silu")
    return Qwen3Config(**read_common(hf), attention_bias=bool(hf.get("attention_bias", False)))


def tiny(**overrides: Any) -> Qwen3Config:
    return Qwen3Config(**tiny_fields(**{"head_dim": 24, **overrides}))


def param_specs(cfg: Qwen3Config) -> dict[str, Any]:
    return layer_param_specs(cfg, swiglu_specs(cfg.hidden_size, cfg.intermediate_size))


def layer_param_specs(cfg: Any, mlp: dict[str, ParamSpec]) -> dict[str, Any]:
    """The decoder's specs with Qwen3's attention half and `mlp` (the MLP's specs) in every layer;
    shared with Qwen3-MoE, whose layer differs only in its MLP."""
    d, h = cfg.hidden_size, cfg.head_dim
    layer: dict[str, ParamSpec] = {
        "attn_norm": ParamSpec((d,), ("norm",)),
        **projection_specs(d, cfg.num_heads, cfg.num_kv_heads, h),
        "mlp_norm": ParamSpec((d,), ("norm",)),
        **mlp,
    }
    if cfg.attention_bias:
        layer.update(qkv_bias_specs(cfg.num_heads, cfg.num_kv_heads, h))
        layer["o_bias"] = ParamSpec((d,), ("norm",))
    layer["q_norm"] = ParamSpec((h,), ("head_dim",))
    layer["k_norm"] = ParamSpec((h,), ("head_dim",))
    return decoder_specs(
        layer, vocab=cfg.vocab_size, embed=d, num_layers=cfg.num_layers, tied=cfg.tie_word_embeddings
    )


# The attention half's rows beyond the decoder's common ones (shared with Qwen3-MoE).
ATTENTION_HF_NAMES = (
    *QKV_BIAS_HF_NAMES,
    Rule("model.layers.{i}.self_attn.o_proj.bias", "layers/o_bias"),
    Rule("model.layers.{i}.self_attn.q_norm.weight", "layers/q_norm"),
    Rule("model.layers.{i}.self_attn.k_norm.weight", "layers/k_norm"),
)
HF_NAMES = decoder_hf_names(*ATTENTION_HF_NAMES)


def rope(cfg: Qwen3Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    return rope_tables(positions, jnp.asarray(cfg.inv_freq()))


def attention_half(
    cfg: Any, p: Params, x: jax.Array, kv: LayerKV | None, ctx: LayerContext
) -> tuple[jax.Array, LayerKV | None]:
    """x + Attention(RMSNorm(x)) with q/k norms: the first half of a Qwen3 (and Qwen3-MoE) layer."""
    eps = cfg.rms_norm_eps
    h = rms_norm(x, p["attn_norm"], eps)
    q, k, v = project(h, p["q"]), project(h, p["k"]), project(h, p["v"])
    if cfg.attention_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
    cos, sin = ctx.rope
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a, kv = ctx.attend(q, k, v, kv)
    o = project_out(a, p["o"])
    if cfg.attention_bias:
        o = o + p["o_bias"]
    return x + o, kv


def block(
    cfg: Qwen3Config, p: Params, x: jax.Array, kv: LayerKV | None, ctx: LayerContext
) -> tuple[jax.Array, LayerKV | None]:
    """One decoder layer on x [B, T, D]; kv: this layer's cache (None without one)."""
    x, kv = attention_half(cfg, p, x, kv, ctx)
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    return x + swiglu_mlp(h, p["gate"], p["up"], p["down"]), kv
