"""Qwen3-MoE: the Qwen3 layer (RMSNorm on each head's query and key before RoPE) with its MLP replaced
by a mixture of experts: a softmax router picks each token's top-k experts (`num_experts_per_tok` of
`num_experts`, weights renormalised with `norm_topk_prob`), and their SwiGLUs
(`moe_intermediate_size` wide) are summed with those weights (`blocks/moe.py`).

    x = x + Attention(RMSNorm(x))      q = RoPE(RMSNorm_q(x Wq)), k = RoPE(RMSNorm_k(x Wk)) per head
    x = x + sum_{e in top-k} w_e SwiGLU_e(RMSNorm(x))

Layers may also be dense, as HF's `Qwen3MoeDecoderLayer` makes them: layer i has the experts when
(i + 1) is a multiple of `decoder_sparse_step` and i is not in `mlp_only_layers`, and otherwise a
plain SwiGLU `intermediate_size` wide. Such a mixed model's layers differ in their parameters'
shapes, so the experts and the dense MLPs are stacked apart from the attention half ("moe_layers" and
"mlp_layers", each over the layers that have it; `ModelConfig.layer_stacks`) and its forward unrolls
the layers (`transformer.split_params`); a model whose layers are all sparse (every published
Qwen3-MoE) keeps one stack and the scan.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

import mllmjax.models.qwen3 as qwen3
from mllmjax.errors import UnsupportedModelError
from mllmjax.models.blocks.mlp import swiglu_mlp, swiglu_specs
from mllmjax.models.blocks.moe import IMPLS, moe_mlp, moe_specs, no_router_stats
from mllmjax.models.blocks.norms import rms_norm
from mllmjax.models.cache import LayerKV
from mllmjax.models.config import ModelConfig, read_common, refuse, tiny_fields
from mllmjax.models.layer import LayerContext
from mllmjax.models.params import Params, ParamSpec, Rule, decoder_hf_names
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
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not one of these
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
        if not isinstance(self.decoder_sparse_step, int) or self.decoder_sparse_step <= 0:
            raise UnsupportedModelError(
                f"decoder_sparse_step must be a positive integer, got {self.decoder_sparse_step!r}"
            )
        dense = self.mlp_only_layers
        if not isinstance(dense, (tuple, list)) or not all(type(i) is int for i in dense):
            raise UnsupportedModelError(f"mlp_only_layers must be a list of layer numbers, got {dense!r}")
        object.__setattr__(self, "mlp_only_layers", tuple(sorted(set(dense))))
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if outside:
            raise UnsupportedModelError(
                f"mlp_only_layers names layer {outside[0]}, but the model has layers 0-{self.num_layers - 1}"
            )
        if not any(self.sparse_layers):
            raise UnsupportedModelError(
                f"no layer has experts (decoder_sparse_step={self.decoder_sparse_step}, mlp_only_layers="
                f"{list(self.mlp_only_layers)}): this is a dense Qwen3 model; only models with at least "
                "one expert layer are read as Qwen3-MoE"
            )
        if self.moe_impl not in IMPLS:
            raise UnsupportedModelError(f"moe_impl {self.moe_impl!r} is not one of {', '.join(IMPLS)}")

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it has the experts (HF's rule; see the module docstring)."""
        return tuple(
            (i + 1) % self.decoder_sparse_step == 0 and i not in self.mlp_only_layers
            for i in range(self.num_layers)
        )

    def layer_stacks(self) -> dict[str, tuple[int, ...]]:
        sparse = self.sparse_layers
        if all(sparse):
            return {}
        return {
            "moe_layers": tuple(i for i, s in enumerate(sparse) if s),
            "mlp_layers": tuple(i for i, s in enumerate(sparse) if not s),
        }

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
    return Qwen3MoeConfig(
        **read_common(hf),
        attention_bias=bool(hf.get("attention_bias", False)),
        num_experts=hf.get("num_experts", hf.get("num_local_experts")),
        num_experts_per_tok=hf.get("num_experts_per_tok"),
        moe_intermediate_size=hf.get("moe_intermediate_size"),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=1 if hf.get("decoder_sparse_step") is None else hf["decoder_sparse_step"],
        mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
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


def tiny(**overrides: Any) -> Qwen3MoeConfig:
    fields = {"head_dim": 24, "num_experts": 5, "num_experts_per_tok": 2, "moe_intermediate_size": 40}
    return Qwen3MoeConfig(**tiny_fields(**{**fields, **overrides}))


def param_specs(cfg: Qwen3MoeConfig) -> dict[str, Any]:
    moe = moe_specs(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
    stacks = cfg.layer_stacks()
    if not stacks:
        return layer_param_specs(cfg, moe)
    mlp = swiglu_specs(cfg.hidden_size, cfg.intermediate_size)
    specs = layer_param_specs(cfg, {})
    for name, part in (("moe_layers", moe), ("mlp_layers", mlp)):
        n = len(stacks[name])
        specs[name] = {k: ParamSpec((n, *s.shape), ("layers", *s.axes)) for k, s in part.items()}
    return specs


# {j}: the expert index; each HF expert tensor is one [layer, expert] slice of a stacked parameter.
_EXPERT = "model.layers.{i}.mlp.experts.{j}."
# A mixed model's experts and dense MLPs live in stacks of their own, whose slot s is the HF layer
# `cfg.layer_stacks()[stack][s]` ({i} is that layer's number: `weights.table.expected_hf_tensors`).
_MLP = "model.layers.{i}.mlp."
HF_NAMES = decoder_hf_names(
    *ATTENTION_HF_NAMES,
    *(
        rule
        for stack in ("layers", "moe_layers")
        for rule in (
            Rule(_MLP + "gate.weight", f"{stack}/router", "transpose"),
            Rule(_EXPERT + "gate_proj.weight", f"{stack}/experts_gate", "transpose"),
            Rule(_EXPERT + "up_proj.weight", f"{stack}/experts_up", "transpose"),
            Rule(_EXPERT + "down_proj.weight", f"{stack}/experts_down", "transpose"),
        )
    ),
    Rule(_MLP + "gate_proj.weight", "mlp_layers/gate", "transpose"),
    Rule(_MLP + "up_proj.weight", "mlp_layers/up", "transpose"),
    Rule(_MLP + "down_proj.weight", "mlp_layers/down", "transpose"),
)
rope = qwen3.rope


def block(
    cfg: Qwen3MoeConfig, p: Params, x: jax.Array, kv: LayerKV | None, ctx: LayerContext
) -> tuple[jax.Array, LayerKV | None, dict[str, jax.Array]]:
    """One decoder layer on x [B, T, D]; kv: this layer's cache (None without one). Returns the
    router's statistics too (`blocks.moe.router_stats`), for the load-balancing loss."""
    x, kv = attention_half(cfg, p, x, kv, ctx)
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    if "router" not in p:  # a dense layer of a mixed model: no router, statistics of none
        return x + swiglu_mlp(h, p["gate"], p["up"], p["down"]), kv, no_router_stats(cfg.num_experts)
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
