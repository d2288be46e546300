"""Qwen3-MoE: the Qwen3 layer (RMSNorm on each head's query and key before RoPE) with its MLP replaced
by a mixture of experts: a softmax router picks each token's top-k experts (`num_experts_per_tok` of
`num_experts`, weights renormalised with `norm_topk_prob`), and their SwiGLUs
(`moe_intermediate_size` wide) are summed with those weights (`blocks/moe.py`).

    x = x + Attention(RMSNorm(x))      q = RoPE(RMSNorm_q(x Wq)), k = RoPE(RMSNorm_k(x Wk)) per head
    x = x + sum_{e in top-k} w_e SwiGLU_e(RMSNorm(x))

Every layer is sparse: HF's mixed layouts (dense MLPs in `mlp_only_layers`, or only every
`decoder_sparse_step`-th layer sparse) give layers of different parameter shapes, which the stacked
layer scan cannot hold, and are refused (the published Qwen3-MoE checkpoints are uniform).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mllmjax.errors import UnsupportedModelError
from mllmjax.models.blocks.attention import projection_specs, qkv_bias_specs
from mllmjax.models.blocks.linear import project, project_out
from mllmjax.models.blocks.moe import IMPLS, moe_mlp, moe_specs
from mllmjax.models.blocks.norms import rms_norm
from mllmjax.models.blocks.rope import apply_rope, rope_tables
from mllmjax.models.cache import LayerKV
from mllmjax.models.config import ModelConfig, read_common, refuse, tiny_fields
from mllmjax.models.layer import LayerContext
from mllmjax.models.params import QKV_BIAS_HF_NAMES, Params, ParamSpec, Rule, decoder_hf_names, decoder_specs

ARCHITECTURES = ("Qwen3MoeForCausalLM",)
MODEL_TYPES = ("qwen3_moe",)
GGUF_ARCHITECTURE = "qwen3moe"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(ModelConfig):
    family: ClassVar[str] = "qwen3_moe"
    attention_bias: bool = False  # q, k, v and o projections with biases
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    # The grouped-matmul form (`blocks.moe.IMPLS`): "auto" follows the backend; "dense" runs every
    # expert on every token (the benchmark's baseline). Not an HF setting.
    moe_impl: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedModelError(f"{name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
            )
        if self.moe_impl not in IMPLS:
            raise UnsupportedModelError(f"moe_impl {self.moe_impl!r} is not one of {', '.join(IMPLS)}")

    def param_specs(self) -> dict[str, Any]:
        return param_specs(self)


Config = Qwen3MoeConfig

# Router settings of other MoE families, each with the one value this router implements.
_ROUTER_KEYS: dict[str, Any] = {
    "scoring_func": "softmax",  # DeepSeek-V3's sigmoid scores
    "topk_method": "greedy",  # DeepSeek's group-limited selection
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "n_shared_experts": 0,  # experts every token runs through (DeepSeek, Qwen2-MoE)
    "shared_expert_intermediate_size": 0,
    "router_jitter_noise": 0.0,  # Mixtral's training-time noise
}


def config_from_hf(hf: dict[str, Any]) -> Qwen3MoeConfig:
    refuse(hf, activation="silu")
    _refuse_router(hf)
    _refuse_mixed_layers(hf)
    return Qwen3MoeConfig(
        **read_common(hf),
        attention_bias=bool(hf.get("attention_bias", False)),
        num_experts=hf.get("num_experts", hf.get("num_local_experts")),
        num_experts_per_tok=hf.get("num_experts_per_tok"),
        moe_intermediate_size=hf.get("moe_intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def _refuse_router(hf: dict[str, Any]) -> None:
    """Refuse router variants this block would silently get wrong: it is the softmax top-k router."""
    for key, supported in _ROUTER_KEYS.items():
        value = hf.get(key)
        if value is not None and value != supported:
            raise UnsupportedModelError(
                f"MoE router {key}={value!r} is not supported; only the softmax top-k router "
                f"({key}={supported!r}) is"
            )


def _refuse_mixed_layers(hf: dict[str, Any]) -> None:
    step, dense = hf.get("decoder_sparse_step", 1), list(hf.get("mlp_only_layers") or [])
    if step != 1 or dense:
        raise UnsupportedModelError(
            f"mixed dense and MoE layers (decoder_sparse_step={step}, mlp_only_layers={dense}) are not "
            "supported; only every layer sparse (decoder_sparse_step=1, mlp_only_layers=[]) is"
        )


def tiny(**overrides: Any) -> Qwen3MoeConfig:
    fields = {"head_dim": 24, "num_experts": 5, "num_experts_per_tok": 2, "moe_intermediate_size": 40}
    return Qwen3MoeConfig(**tiny_fields(**{**fields, **overrides}))


def param_specs(cfg: Qwen3MoeConfig) -> dict[str, Any]:
    d, h = cfg.hidden_size, cfg.head_dim
    layer: dict[str, ParamSpec] = {
        "attn_norm": ParamSpec((d,), ("norm",)),
        **projection_specs(d, cfg.num_heads, cfg.num_kv_heads, h),
        "mlp_norm": ParamSpec((d,), ("norm",)),
        **moe_specs(d, cfg.moe_intermediate_size, cfg.num_experts),
    }
    if cfg.attention_bias:
        layer.update(qkv_bias_specs(cfg.num_heads, cfg.num_kv_heads, h))
        layer["o_bias"] = ParamSpec((d,), ("norm",))
    layer["q_norm"] = ParamSpec((h,), ("head_dim",))
    layer["k_norm"] = ParamSpec((h,), ("head_dim",))
    return decoder_specs(
        layer, vocab=cfg.vocab_size, embed=d, num_layers=cfg.num_layers, tied=cfg.tie_word_embeddings
    )


# {j}: the expert index; each HF expert tensor is one [layer, expert] slice of a stacked parameter.
_EXPERT = "model.layers.{i}.mlp.experts.{j}."
HF_NAMES = decoder_hf_names(
    *QKV_BIAS_HF_NAMES,
    Rule("model.layers.{i}.self_attn.o_proj.bias", "layers/o_bias"),
    Rule("model.layers.{i}.self_attn.q_norm.weight", "layers/q_norm"),
    Rule("model.layers.{i}.self_attn.k_norm.weight", "layers/k_norm"),
    Rule("model.layers.{i}.mlp.gate.weight", "layers/router", "transpose"),
    Rule(_EXPERT + "gate_proj.weight", "layers/experts_gate", "transpose"),
    Rule(_EXPERT + "up_proj.weight", "layers/experts_up", "transpose"),
    Rule(_EXPERT + "down_proj.weight", "layers/experts_down", "transpose"),
)


def rope(cfg: Qwen3MoeConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    return rope_tables(positions, jnp.asarray(cfg.inv_freq()))


def block(
    cfg: Qwen3MoeConfig, p: Params, x: jax.Array, kv: LayerKV | None, ctx: LayerContext
) -> tuple[jax.Array, LayerKV | None, dict[str, jax.Array]]:
    """One decoder layer on x [B, T, D]; kv: this layer's cache (None without one). Returns the
    router's statistics too (`blocks.moe.router_stats`), for the load-balancing loss."""
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
    x = x + o
    h = rms_norm(x, p["mlp_norm"], eps)
    y, stats = moe_mlp(
        h,
        p["router"],
        p["experts_gate"],
        p["experts_up"],
        p["experts_down"],
        top_k=cfg.num_experts_per_tok,
        norm_topk_prob=cfg.norm_topk_prob,
        valid=ctx.valid,
        impl=cfg.moe_impl,
    )
    return x + y, kv, stats
