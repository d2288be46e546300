"""Rotary position embeddings: reading them from an HF config, their frequencies, and applying them.

Scaling types: default, linear and llama3. `read_rope` takes the transformers-5 spelling
(`rope_parameters`, possibly per layer type) and the older one (`rope_theta`, `rope_scaling`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllmjax.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# None, or a sorted tuple of the scaling dict's items, so a config holding it stays hashable.
RopeScaling = tuple[tuple[str, Any], ...] | None


def check_scaling(scaling: RopeScaling) -> None:
    kind = dict(scaling).get("rope_type") if scaling is not None else "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )


def read_rope(hf: dict[str, Any], layer_type: str = "full_attention") -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling dict or None for default RoPE) of an HF config; per-layer-type configs give
    the entry of `layer_type`."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params:
        params = params[layer_type]
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
    check_scaling((("rope_type", kind),))
    return theta, {"rope_type": kind, **scaling}


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Rotary inverse frequencies [head_dim // 2], float32, with the given scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    params = dict(scaling or {"rope_type": "default"})
    kind = params["rope_type"]
    if kind == "linear":
        inv = inv / float(params["factor"])
    elif kind == "llama3":
        factor = float(params["factor"])
        low = float(params.get("low_freq_factor", 1.0))
        high = float(params.get("high_freq_factor", 4.0))
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, inv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, H/2] of positions [B, T], shared by every layer. A decode loop passes
    them into the forward, computed one step ahead: inside it XLA:CPU fuses the trig into each
    layer's RoPE and evaluates it per head."""
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
    return jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the HF convention). x: [B, T, N, H]; cos, sin from `rope_tables`."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
