"""Gemma 2: grouped-query attention with soft-capped scores, alternating sliding-window and global
layers, a GeGLU MLP, and a norm before and after each sublayer; Gemma's RMSNorm scales by (1 + w).

    x = embed(tokens) * sqrt(hidden)                      (in the compute dtype, as HF does)
    x = x + Norm(Attention(Norm(x)))                      scale query_pre_attn_scalar ** -0.5,
                                                          scores -> c * tanh(scores / c)
    x = x + Norm(GeGLU(Norm(x)))                          gelu with the tanh approximation
    logits = c' * tanh(head(Norm(x)) / c')                final_logit_softcapping; the head is tied

Layer i is a sliding-window layer (it sees its W - 1 predecessors and itself) when `layer_types[i]`
says so; HF's default alternates, starting with a sliding layer. One RoPE base serves every layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mllmjax.errors import UnsupportedModelError
from mllmjax.models.blocks.attention import projection_specs
from mllmjax.models.blocks.linear import project, project_out
from mllmjax.models.blocks.mlp import geglu_mlp, swiglu_specs
from mllmjax.models.blocks.norms import gemma_rms_norm
from mllmjax.models.blocks.rope import apply_rope, rope_tables
from mllmjax.models.cache import LayerKV
from mllmjax.models.config import ModelConfig, read_common, tiny_fields
from mllmjax.models.layer import LayerContext
from mllmjax.models.params import Params, ParamSpec, Rule, decoder_hf_names, decoder_specs

ARCHITECTURES = ("Gemma2ForCausalLM",)
MODEL_TYPES = ("gemma2",)
GGUF_ARCHITECTURE = "gemma2"

SLIDING, GLOBAL = "sliding_attention", "full_attention"
ACTIVATION = "gelu_pytorch_tanh"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma2Config(ModelConfig):
    family: ClassVar[str] = "gemma2"
    norm_identity: ClassVar[float] = 0.0
    query_pre_attn_scalar: float = 256.0  # attention scores are scaled by its inverse square root
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()  # SLIDING or GLOBAL per layer; () = HF's default pattern
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.family, self.num_layers))
        super().__post_init__()
        check_layer_types(self.layer_types, self.num_layers, self.sliding_window)

    @property
    def sliding(self) -> tuple[bool, ...]:
        """Per layer: whether it is a sliding-window layer."""
        return tuple(t == SLIDING for t in self.layer_types)

    def layer_windows(self) -> tuple[int | None, ...]:
        return tuple(self.sliding_window if s else None for s in self.sliding)

    def param_specs(self) -> dict[str, Any]:
        return param_specs(self)

    def embed_multiplier(self) -> float | None:
        return math.sqrt(self.hidden_size)

    def final_norm(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        return gemma_rms_norm(x, weight, self.rms_norm_eps)


Config = Gemma2Config


def default_layer_types(family: str, num_layers: int) -> tuple[str, ...]:
    """HF's pattern when a config lists no layer types: Gemma 2 alternates (layer 0 slides); Gemma 3
    makes every sixth layer global."""
    period = 2 if family == "gemma2" else 6
    return tuple(GLOBAL if (i + 1) % period == 0 else SLIDING for i in range(num_layers))


def check_layer_types(layer_types: tuple[str, ...], num_layers: int, window: int | None) -> None:
    if len(layer_types) != num_layers:
        raise UnsupportedModelError(
            f"layer_types lists {len(layer_types)} layers, the model has {num_layers}"
        )
    unknown = sorted(set(layer_types) - {SLIDING, GLOBAL})
    if unknown:
        raise UnsupportedModelError(
            f"layer type {unknown[0]!r} is not supported; supported: {SLIDING}, {GLOBAL}"
        )
    if SLIDING in layer_types and (window is None or window <= 0):
        raise UnsupportedModelError(f"sliding-window layers need a positive sliding_window, got {window!r}")


def read_gemma(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """The fields Gemma 2 and Gemma 3 read alike from an HF config; refuses what they would get wrong."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or ACTIVATION
    if act != ACTIVATION:
        raise UnsupportedModelError(f"hidden_activation {act!r} is not supported (only {ACTIVATION!r})")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            "bidirectional attention (an embedding model) is not supported; only causal LMs"
        )
    if hf.get("attention_bias"):
        raise UnsupportedModelError("attention_bias=true is not supported for Gemma")
    num_layers = hf["num_hidden_layers"]
    layer_types = tuple(hf.get("layer_types") or ())
    if not layer_types and family == "gemma3" and hf.get("sliding_window_pattern"):
        period = int(hf["sliding_window_pattern"])
        layer_types = tuple(GLOBAL if (i + 1) % period == 0 else SLIDING for i in range(num_layers))

    def cap(key: str) -> float | None:
        value = hf.get(key)
        return float(value) if value else None

    return dict(
        **read_common({**hf, "tie_word_embeddings": hf.get("tie_word_embeddings", True)}),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        sliding_window=hf.get("sliding_window"),
        layer_types=layer_types,
        attn_logit_softcap=cap("attn_logit_softcapping"),
        final_logit_softcap=cap("final_logit_softcapping"),
    )


def config_from_hf(hf: dict[str, Any]) -> Gemma2Config:
    return Gemma2Config(**read_gemma(hf, "gemma2"))


def tiny(**overrides: Any) -> Gemma2Config:
    fields = tiny_fields(num_layers=3, sliding_window=4, query_pre_attn_scalar=24.0, tie_word_embeddings=True)
    return Gemma2Config(**{**fields, **overrides})


def param_specs(cfg: Gemma2Config, *, qk_norm: bool = False) -> dict[str, Any]:
    """Gemma's layer: q/k/v/o, GeGLU gate/up/down, a norm before and after attention and the MLP
    (and, with qk_norm, Gemma 3's per-head q/k norms)."""
    d, h = cfg.hidden_size, cfg.head_dim
    layer: dict[str, ParamSpec] = {
        "attn_norm": ParamSpec((d,), ("norm",)),
        **projection_specs(d, cfg.num_heads, cfg.num_kv_heads, h),
        "post_attn_norm": ParamSpec((d,), ("norm",)),
        "mlp_norm": ParamSpec((d,), ("norm",)),
        **swiglu_specs(d, cfg.intermediate_size),
        "post_mlp_norm": ParamSpec((d,), ("norm",)),
    }
    if qk_norm:
        layer["q_norm"] = ParamSpec((h,), ("head_dim",))
        layer["k_norm"] = ParamSpec((h,), ("head_dim",))
    return decoder_specs(
        layer, vocab=cfg.vocab_size, embed=d, num_layers=cfg.num_layers, tied=cfg.tie_word_embeddings
    )


def gemma_hf_names(*extra: Rule) -> tuple[Rule, ...]:
    """Gemma's HF names: the shared decoder rows, except that `post_attention_layernorm` is the norm
    after attention and `pre_feedforward_layernorm` the one before the MLP."""
    layer = "model.layers.{i}."
    shared = tuple(r for r in decoder_hf_names() if r.ours != "layers/mlp_norm")
    return (
        *shared,
        Rule(layer + "post_attention_layernorm.weight", "layers/post_attn_norm"),
        Rule(layer + "pre_feedforward_layernorm.weight", "layers/mlp_norm"),
        Rule(layer + "post_feedforward_layernorm.weight", "layers/post_mlp_norm"),
        *extra,
    )


HF_NAMES = gemma_hf_names()


def rope(cfg: Gemma2Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    return rope_tables(positions, jnp.asarray(cfg.inv_freq()))


def gemma_block(
    cfg: Gemma2Config,
    p: Params,
    x: jax.Array,
    kv: LayerKV | None,
    ctx: LayerContext,
    cos_sin: tuple[jax.Array, jax.Array],
    *,
    qk_norm: bool,
) -> tuple[jax.Array, LayerKV | None]:
    """One Gemma layer on x [B, T, D], given this layer's rope tables (and Gemma 3's q/k norms)."""
    eps = cfg.rms_norm_eps
    h = gemma_rms_norm(x, p["attn_norm"], eps)
    q, k, v = project(h, p["q"]), project(h, p["k"]), project(h, p["v"])
    if qk_norm:
        q, k = gemma_rms_norm(q, p["q_norm"], eps), gemma_rms_norm(k, p["k_norm"], eps)
    cos, sin = cos_sin
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a, kv = ctx.attend(
        q,
        k,
        v,
        kv,
        scale=cfg.query_pre_attn_scalar**-0.5,
        softcap=cfg.attn_logit_softcap,
        window=ctx.window(cfg.sliding, cfg.sliding_window),
    )
    x = x + gemma_rms_norm(project_out(a, p["o"]), p["post_attn_norm"], eps)
    h = gemma_rms_norm(x, p["mlp_norm"], eps)
    h = geglu_mlp(h, p["gate"], p["up"], p["down"])
    return x + gemma_rms_norm(h, p["post_mlp_norm"], eps), kv


def block(
    cfg: Gemma2Config, p: Params, x: jax.Array, kv: LayerKV | None, ctx: LayerContext
) -> tuple[jax.Array, LayerKV | None]:
    """One decoder layer on x [B, T, D]; kv: this layer's cache (None without one)."""
    return gemma_block(cfg, p, x, kv, ctx, ctx.rope, qk_norm=False)
