"""The activations of the plain (ungated) MLPs, by their HF `hidden_act` name.

A config reads its activation name from the HF config and refuses one missing here; the block looks
the function up by that name (a string keeps the config hashable)."""

from __future__ import annotations

from collections.abc import Callable

import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # the exact (erf) GELU
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's sigmoid approximation
}
