"""The model configuration every family extends: the fields all decoder-only LMs here share.

A family subclasses `ModelConfig` in its own module (`LlamaConfig` in `llama.py`, ...) with the fields
only it has, and reads it from the HF config with `read_common` plus its own keys; `registry`
dispatches an HF config to its family. Configs are frozen and hashable: they are static arguments of
jitted functions (rope scaling is stored as a sorted tuple of items for that reason).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import numpy as np

from mllmjax.errors import UnsupportedModelError
from mllmjax.models.blocks import rope
from mllmjax.models.blocks.norms import rms_norm
from mllmjax.models.params import map_specs

_POSITIVE = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: ClassVar[str] = ""  # the registry name, set by each family's subclass
    norm_identity: ClassVar[float] = 1.0  # the norm weight that scales by one (Gemma stores w for 1 + w)

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": one of rope.SUPPORTED_ROPE_TYPES, plus that type's keys}
    rope_scaling: rope.RopeScaling | dict[str, Any] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    # logits -> c * tanh(logits / c) before the softmax (Gemma 2's final_logit_softcapping), or None
    final_logit_softcap: float | None = None

    def __post_init__(self) -> None:
        if not self.family:
            raise TypeError("ModelConfig is the base of the family configs; build one with a family's class")
        for name in _POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedModelError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        rope.check_scaling(self.rope_scaling)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def param_specs(self) -> dict[str, Any]:
        """Shape and logical axis names of every parameter, as a tree shaped like the params."""
        raise NotImplementedError(f"{type(self).__name__} does not declare its parameters")

    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer: its sliding attention window W (it sees itself and its W - 1 predecessors), or
        None for a layer that sees the whole causal past. The KV cache keeps a ring buffer of
        min(W, cache length) slots for a windowed layer (`mllmjax.models.cache`)."""
        return (None,) * self.num_layers

    def layer_stacks(self) -> dict[str, tuple[int, ...]]:
        """The stacked parameter trees besides "layers" that hold weights only some layers have, each
        as the layer numbers of its slots in order: a model whose layers differ in their parameters'
        shapes (Qwen3-MoE's dense MLPs among its expert layers). {} when every layer has the same
        parameters, all in "layers". Layer i's parameters are "layers"[i] merged with slot
        `stack.index(i)` of each stack that holds layer i (`transformer.split_params`)."""
        return {}

    def embed_multiplier(self) -> float | None:
        """What the driver multiplies the token embeddings by, in the compute dtype (Gemma: sqrt(hidden));
        `transformer.embed_tokens` applies it, input embeddings passed as `embeds=` are taken as given."""
        return None

    def final_norm(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        """The norm after the last layer (RMSNorm; Gemma's is (1 + w)-scaled)."""
        return rms_norm(x, weight, self.rms_norm_eps)

    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [head_dim // 2], float32, with the configured scaling."""
        return rope.inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    def num_params(self) -> int:
        counts: list[int] = []
        map_specs(lambda _, spec: counts.append(math.prod(spec.shape)), self.param_specs())
        return sum(counts)


def read_common(hf: dict[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields of a transformers `config.json` dict (both spellings of rope and dtype)."""
    heads = hf["num_attention_heads"]
    theta, scaling = rope.read_rope(hf)
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def refuse(hf: dict[str, Any], *, activation: str) -> None:
    """Raise UnsupportedModelError on the HF settings a plain Llama-style block would silently get
    wrong: another activation, MLP biases, sliding-window attention."""
    act = hf.get("hidden_act", activation)
    if act != activation:
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only {activation!r})")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise UnsupportedModelError("sliding-window attention (use_sliding_window=true) is not supported")


def tiny_fields(**overrides: Any) -> dict[str, Any]:
    """The shared fields of the tiny test configs: GQA, 2 layers, a 256-token vocabulary."""
    base: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=512,
    )
    base.update(overrides)
    return base
