"""Attention backends behind one call (`attend`): XLA, cuDNN's fused kernel, and Pallas on TPU.

The backend is data the caller hands the forward (`Kernel`), chosen from the hardware and the dtype
by `resolve_attention`, never from array shapes. A kernel that runs per device is given the mesh and
the mesh axes of the rows and heads by the caller: the models never read the sharding rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from mllmjax.errors import BadInputError
from mllmjax.models.blocks.attention import Window, attention, attention_causal, visible

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
PALLAS_BLOCK = 128  # the TPU kernel's default block along the sequence


@dataclasses.dataclass(frozen=True)
class Kernel:
    """How a full-sequence forward computes attention (a forward with a KV cache always uses XLA).

    name: "xla", "cudnn" or "pallas" (from `resolve_attention`), or "fused-xla" (the cuDNN entry
    point with XLA's kernel, to test that wiring on any backend). mesh, row_axes, head_axes: where
    the arrays live, for "pallas", which runs per device under shard_map (`mllmjax.sharding.kernel`
    fills them in); the other backends leave the partitioning to XLA.
    """

    name: str = "xla"
    mesh: jax.sharding.Mesh | None = None
    row_axes: tuple[str, ...] = ()
    head_axes: tuple[str, ...] = ()


def resolve_attention(name: str, compute_dtype: Any, backend: str | None = None) -> str:
    """The attention implementation a full-sequence forward (training, log-probs) uses.

    "xla": `attention_causal`, everywhere. "cudnn": cuDNN's fused flash attention through
    `jax.nn.dot_product_attention` (GPU only, bfloat16/float16 only: what the kernel takes).
    "pallas": JAX's Pallas flash-attention kernel for TPU. "auto" picks cudnn on a GPU with a
    half-precision compute dtype, pallas on a TPU, and xla otherwise.
    """
    if name not in ATTENTION_IMPLS:
        raise BadInputError(f"unknown attention {name!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
    backend = backend or jax.default_backend()
    half = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "cudnn":
        if backend != "gpu":
            raise BadInputError(f"--attention cudnn needs a GPU; this run is on {backend}")
        if not half:
            raise BadInputError("--attention cudnn needs --compute-dtype bfloat16 or float16")
        return "cudnn"
    if name == "pallas":
        if backend != "tpu":
            raise BadInputError(f"--attention pallas needs a TPU; this run is on {backend}")
        return "pallas"
    if name == "auto":
        if backend == "tpu":
            return "pallas"
        return "cudnn" if backend == "gpu" and half else "xla"
    return "xla"


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    kernel: Kernel,
    *,
    cache_layout: bool | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    window: Window = None,
    reach: jax.Array | None = None,
) -> jax.Array:
    """Attention of q [B, T, N, H] over k, v with the position mask, by the kernel's backend.

    cache_layout None: k, v [B, T, K, H] are the queries' own tokens (full forward). True/False: k, v
    are a KV cache (per-layer layout or [B, S, K, H]), which always goes through XLA. scale, softcap,
    window, reach: see `attention`. The fused kernels take a scale but neither soft-capping, a window
    nor a reach: a layer with any of them runs through XLA.
    """
    options = dict(scale=scale, softcap=softcap, window=window)
    if cache_layout is not None:
        return attention(q, k, v, q_pos, k_pos, cache_layout=cache_layout, reach=reach, **options)
    if softcap is not None or window is not None or reach is not None or kernel.name == "xla":
        return attention_causal(q, k, v, q_pos, k_pos, reach, **options)
    if kernel.name == "pallas":
        return attention_pallas(q, k, v, q_pos, k_pos, kernel, scale=scale)
    impl = "xla" if kernel.name == "fused-xla" else kernel.name
    return attention_fused(q, k, v, q_pos, k_pos, implementation=impl, scale=scale)


def attention_fused(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    implementation: str,
    scale: float | None = None,
) -> jax.Array:
    """`attention` through jax.nn.dot_product_attention (implementation "cudnn" or, for tests, "xla").

    A query that sees no key (padding) is given its own slot, so no row of the fused softmax is empty;
    such rows are padding and never read. The mask is passed whole, so left and right padding work.
    """
    t, s = q.shape[1], k.shape[1]
    mask = visible(q_pos, k_pos)
    if t == s:
        mask = mask | jnp.eye(t, dtype=bool)[None]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, implementation=implementation
    )


def _pallas_specs(kernel: Kernel, q: jax.Array, k: jax.Array) -> tuple[Any, Any] | None:
    """(per-head, per-position) PartitionSpecs of the shard_map, or None to run on the whole arrays."""
    from jax.sharding import PartitionSpec as P

    mesh = kernel.mesh
    if mesh is None or mesh.size <= 1:
        return None
    rows = math.prod(mesh.shape[a] for a in kernel.row_axes)
    row_spec = kernel.row_axes if kernel.row_axes and q.shape[0] % rows == 0 else None
    heads = math.prod(mesh.shape[a] for a in kernel.head_axes)
    split = kernel.head_axes and q.shape[2] % heads == 0 and k.shape[2] % heads == 0
    head_spec = (kernel.head_axes[0] if len(kernel.head_axes) == 1 else kernel.head_axes) if split else None
    return P(row_spec, None, head_spec, None), P(row_spec, None)


def attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    kernel: Kernel = Kernel(),
    scale: float | None = None,
) -> jax.Array:
    """`attention` through JAX's Pallas TPU flash-attention kernel (elsewhere, run and compiled under
    `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`, as the tests do).

    On a mesh of several devices the kernel runs per device under `jax.shard_map`, rows split over the
    row axes and heads over the head axes where they divide evenly: a custom kernel is one opaque call,
    and XLA would otherwise gather its sharded inputs onto every device.

    Full-sequence forward only, with positions increasing along each row's valid tokens (the
    trainer's layout): the kernel's causal-by-index mask plus a segment id that separates valid tokens
    from padding then equals the position mask. The sequence is padded to the kernel's blocks and kv
    heads are repeated to the query heads.
    """
    specs = _pallas_specs(kernel, q, k)
    if specs is not None:
        heads, pos = specs
        return jax.shard_map(
            lambda *a: attention_pallas(*a, scale=scale), mesh=kernel.mesh, in_specs=(heads, heads, heads, pos, pos),
            out_specs=heads, check_vma=False,
        )(q, k, v, q_pos, k_pos)  # fmt: skip
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, t, n, h = q.shape
    groups = n // k.shape[2]
    pad = (-t) % PALLAS_BLOCK

    def heads_first(x: jax.Array, repeat: int) -> jax.Array:
        x = jnp.repeat(x, repeat, axis=2) if repeat > 1 else x
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))

    segments = jnp.pad((k_pos >= 0).astype(jnp.int32), ((0, 0), (0, pad)))
    args = (heads_first(q, 1), heads_first(k, groups), heads_first(v, groups))
    out = fa.flash_attention(
        *args,
        segment_ids=fa.SegmentIds(q=segments, kv=segments),
        causal=True,
        sm_scale=h**-0.5 if scale is None else scale,
    )
    return out[:, :, :t].transpose(0, 2, 1, 3)
