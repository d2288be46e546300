"""Model configuration: one decoder for the Llama family, Qwen2/Qwen2.5 and Qwen3.

The three families differ only in a few switches, so they share one config and one decoder:

- Llama (SmolLM2, Llama 2/3): no biases unless `attention_bias` (then q, k, v and o all have one),
  optional Llama-3 `rope_scaling`.
- Qwen2/Qwen2.5: q, k and v carry a bias, o does not.
- Qwen3: RMSNorm on q and k per head, an explicit `head_dim` that need not be hidden/heads.

`from_hf_config` reads both the transformers-5 spelling (`rope_parameters`, `dtype`) and the older one
(`rope_theta`, `rope_scaling`, `torch_dtype`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from mllmjax.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": one of SUPPORTED_ROPE_TYPES, plus that type's keys}; stored as a sorted
    # tuple of items so the config is hashable (it is a static argument of jitted functions).
    rope_scaling: tuple[tuple[str, Any], ...] | dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unknown model family {self.family!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
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
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type")
            if kind not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    # ------------------------------------------------------------------ HF config
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a transformers `config.json` dict; raise UnsupportedModelError on anything we
        would silently get wrong."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        family = None
        for arch in archs:
            family = SUPPORTED_ARCHITECTURES.get(arch, family)
        if family is None:
            family = SUPPORTED_MODEL_TYPES.get(model_type)
        if family is None:
            got = ", ".join(archs) or model_type or "nothing"
            raise UnsupportedModelError(
                f"unsupported architecture {got}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention (use_sliding_window=true) is not supported")

        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        theta, scaling = _read_rope(hf)
        attention_bias = bool(hf.get("attention_bias", False))
        if family == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = attention_bias
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=family == "qwen3",
        )

    # ------------------------------------------------------------------ RoPE
    def inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies [head_dim // 2], float32, with the configured scaling."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        scaling = dict(self.rope_scaling or {"rope_type": "default"})
        kind = scaling["rope_type"]
        if kind == "linear":
            inv = inv / float(scaling["factor"])
        elif kind == "llama3":
            factor = float(scaling["factor"])
            low = float(scaling.get("low_freq_factor", 1.0))
            high = float(scaling.get("high_freq_factor", 4.0))
            old_len = float(scaling["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old_len / low, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
            inv = np.where(medium, smoothed, scaled)
        return inv.astype(np.float32)

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, family: str = "llama", **overrides: Any) -> ModelConfig:
        """A small config for tests: GQA, head_dim != hidden/heads for qwen3."""
        base: dict[str, Any] = dict(
            family=family,
            vocab_size=256,
            hidden_size=64,
            intermediate_size=96,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            max_position_embeddings=512,
            tie_word_embeddings=family == "llama",
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
        )
        if family == "qwen3":
            base["head_dim"] = 24
        base.update(overrides)
        return cls(**base)

    @classmethod
    def smollm2_135m(cls) -> ModelConfig:
        return cls(
            family="llama",
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

    def num_params(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            per_layer += d
        if self.qk_norm:
            per_layer += 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + head + d + self.num_layers * per_layer


def _read_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    legacy = hf.get("rope_scaling")
    if params:
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = dict(legacy) if legacy else {}
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if kind == "default":
        return theta, None
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return theta, {"rope_type": kind, **scaling}
