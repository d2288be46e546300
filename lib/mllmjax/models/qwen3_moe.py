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

import mllmjax.models.qwen3 as qwen3
from mllmjax.errors import UnsupportedModelError
from mllmjax.models.blocks.moe import IMPLS, moe_mlp, moe_specs
from mllmjax.models.blocks.norms import rms_norm
from mllmjax.models.cache import LayerKV
from mllmjax.models.config import ModelConfig, read_common, refuse, tiny_fields
from mllmjax.models.layer import LayerContext
from mllmjax.models.params import Params, Rule, decoder_hf_names
from mllmjax.models.qwen3 import ATTENTION_HF_NAMES, attention_half, layer_param_specs

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
    return layer_param_specs(cfg, moe_specs(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts))


# {j}: the expert index; each HF expert tensor is one [layer, expert] slice of a stacked parameter.
_EXPERT = "model.layers.{i}.mlp.experts.{j}."
HF_NAMES = decoder_hf_names(
    *ATTENTION_HF_NAMES,
    Rule("model.layers.{i}.mlp.gate.weight", "layers/router", "transpose"),
    Rule(_EXPERT + "gate_proj.weight", "layers/experts_gate", "transpose"),
    Rule(_EXPERT + "up_proj.weight", "layers/experts_up", "transpose"),
    Rule(_EXPERT + "down_proj.weight", "layers/experts_down", "transpose"),
)
rope = qwen3.rope


def block(
    cfg: Qwen3MoeConfig, p: Params, x: jax.Array, kv: LayerKV | None, ctx: LayerContext
) -> tuple[jax.Array, LayerKV | None, dict[str, jax.Array]]:
    """One decoder layer on x [B, T, D]; kv: this layer's cache (None without one). Returns the
    router's statistics too (`blocks.moe.router_stats`), for the load-balancing loss."""
    x, kv = attention_half(cfg, p, x, kv, ctx)
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
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
