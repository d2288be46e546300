"""MLPs: the decoders' gated ones, and the plain two-layer one of vision towers and projectors."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mllmjax.models.blocks.activations import ACTIVATIONS
from mllmjax.models.blocks.cpu import OutMajor, dense
from mllmjax.models.params import ParamSpec


def swiglu_specs(d: int, f: int) -> dict[str, ParamSpec]:
    return {
        "gate": ParamSpec((d, f), ("embed", "mlp")),
        "up": ParamSpec((d, f), ("embed", "mlp")),
        "down": ParamSpec((f, d), ("mlp", "embed")),
    }


def swiglu_mlp(
    x: jax.Array, gate: jax.Array | OutMajor, up: jax.Array | OutMajor, down: jax.Array | OutMajor
) -> jax.Array:
    """down(silu(gate(x)) * up(x)), the Llama MLP."""
    return dense(swiglu(dense(x, gate), dense(x, up)), down)


def geglu_mlp(
    x: jax.Array, gate: jax.Array | OutMajor, up: jax.Array | OutMajor, down: jax.Array | OutMajor
) -> jax.Array:
    """down(gelu_tanh(gate(x)) * up(x)), the Gemma MLP (HF `gelu_pytorch_tanh`: the tanh approximation)."""
    return dense(jax.nn.gelu(dense(x, gate), approximate=True) * dense(x, up), down)


def plain_mlp(
    x: jax.Array,
    fc1: jax.Array,
    fc1_bias: jax.Array | None,
    fc2: jax.Array,
    fc2_bias: jax.Array | None,
    act: str,
) -> jax.Array:
    """fc2(act(fc1(x))), each linear layer with its bias unless that is None (CLIP/SigLIP's MLP, the
    LLaVA projector); act: a name of `activations.ACTIVATIONS`."""
    h = dense(x, fc1)
    if fc1_bias is not None:
        h = h + fc1_bias
    y = dense(ACTIVATIONS[act](h), fc2)
    return y if fc2_bias is None else y + fc2_bias


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, whose backward keeps only gate and up and recomputes the sigmoid: autodiff
    would save the sigmoid and silu(gate) too, two more [tokens, F] arrays per layer."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, up = res
    x, g32 = gate.astype(jnp.float32), g.astype(jnp.float32)
    s = jax.nn.sigmoid(x)
    d_gate = g32 * up.astype(jnp.float32) * s * (1.0 + x * (1.0 - s))
    return d_gate.astype(gate.dtype), (g32 * x * s).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
