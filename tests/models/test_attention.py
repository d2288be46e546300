"""Attention implementations: the fused entry point (cuDNN's on GPU) against ours, and the choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllmjax import models
from mllmjax.errors import BadInputError
from mllmjax.models import transformer
from mllmjax.models.blocks import attention, kernels
from mllmjax.models.blocks.kernels import Kernel


def _padded_positions(b: int, t: int) -> np.ndarray:
    """Rows left-padded, right-padded and unpadded: position -1 marks padding."""
    pos = np.full((b, t), -1, np.int32)
    for i in range(b):
        n = t - (i % 3) * 2
        start = 0 if i % 2 else t - n
        pos[i, start : start + n] = np.arange(n)
    return pos


def test_fused_attention_equals_ours_with_padding_and_gqa():
    rng = np.random.default_rng(0)
    b, t, n, k, h = 6, 12, 6, 2, 16
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, x, h)), jnp.float32) for x in (n, k, k))
    pos = jnp.asarray(_padded_positions(b, t))
    ours = np.asarray(attention.attention(q, kk, v, pos, pos))
    fused = np.asarray(kernels.attention_fused(q, kk, v, pos, pos, implementation="xla"))
    real = np.asarray(pos) >= 0  # padding queries are never read
    np.testing.assert_allclose(fused[real], ours[real], atol=1e-5, rtol=1e-5)
    assert np.isfinite(fused).all()


@pytest.mark.parametrize("t, blocks", [(256, 4), (192, 3), (512, 8), (100, 1)])
def test_causal_blocks_equal_the_full_square_with_padding(t, blocks):
    """`attention_causal` (query blocks skip the keys after them) == `attention` on every query that is
    read, with left, right and no padding, and so are the gradients of what is read."""
    assert attention.causal_blocks(t) == blocks
    rng = np.random.default_rng(0)
    b, n, k, h = 6, 6, 2, 8
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, x, h)), jnp.float32) for x in (n, k, k))
    pos = jnp.asarray(_padded_positions(b, t))
    real = jnp.asarray(np.asarray(pos) >= 0)[:, :, None, None]
    w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) * real  # padding queries are never read

    def read(fn, q, kk, v):
        return jnp.sum(w * fn(q, kk, v, pos, pos))

    np.testing.assert_allclose(
        np.asarray(attention.attention_causal(q, kk, v, pos, pos) * real),
        np.asarray(attention.attention(q, kk, v, pos, pos) * real), atol=1e-6, rtol=1e-6,
    )  # fmt: skip
    got = jax.grad(lambda *a: read(attention.attention_causal, *a), argnums=(0, 1, 2))(q, kk, v)
    want = jax.grad(lambda *a: read(attention.attention, *a), argnums=(0, 1, 2))(q, kk, v)
    for a, e in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-5, rtol=1e-5)


def test_forward_through_the_fused_path_equals_ours():
    cfg = models.tiny()
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    b, t = 4, 10
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.asarray(_padded_positions(b, t))
    valid = pos >= 0
    ours, _ = transformer.forward(params, cfg, tokens, jnp.maximum(pos, 0), valid=valid)
    fused, _ = transformer.forward(
        params, cfg, tokens, jnp.maximum(pos, 0), valid=valid, kernel=Kernel("fused-xla")
    )
    np.testing.assert_allclose(np.asarray(fused)[np.asarray(valid)], np.asarray(ours)[np.asarray(valid)],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize(
    "name, dtype, backend, chosen",
    [
        ("auto", jnp.float32, "cpu", "xla"),
        ("auto", jnp.bfloat16, "cpu", "xla"),
        ("auto", jnp.bfloat16, "gpu", "cudnn"),
        ("auto", jnp.float16, "gpu", "cudnn"),
        ("auto", jnp.float32, "gpu", "xla"),  # the cuDNN kernel takes half precision only
        ("auto", jnp.bfloat16, "tpu", "pallas"),
        ("auto", jnp.float32, "tpu", "pallas"),
        ("pallas", jnp.bfloat16, "tpu", "pallas"),
        ("xla", jnp.bfloat16, "gpu", "xla"),
        ("cudnn", jnp.bfloat16, "gpu", "cudnn"),
    ],
)
def test_choice_follows_backend_and_dtype(name, dtype, backend, chosen):
    assert kernels.resolve_attention(name, dtype, backend) == chosen


def test_refused_choices():
    with pytest.raises(BadInputError, match="needs a GPU"):
        kernels.resolve_attention("cudnn", jnp.bfloat16, "cpu")
    with pytest.raises(BadInputError, match="bfloat16 or float16"):
        kernels.resolve_attention("cudnn", jnp.float32, "gpu")
    with pytest.raises(BadInputError, match="needs a TPU"):
        kernels.resolve_attention("pallas", jnp.float32, "gpu")
    with pytest.raises(BadInputError, match="unknown attention"):
        kernels.resolve_attention("flash", jnp.float32, "cpu")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_attention_matches_ours_on_gpu():
    """Run by scripts/gpu_check.sh: the training forward with --attention cudnn against the XLA path,
    bfloat16, padded rows; bfloat16 tolerance (the kernels sum in different orders)."""
    cfg = models.tiny()
    params = transformer.init_params(cfg, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
    b, t = 4, 64
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.asarray(_padded_positions(b, t))
    valid = np.asarray(pos >= 0)
    ours, _ = transformer.forward(params, cfg, tokens, jnp.maximum(pos, 0), valid=pos >= 0)
    fused, _ = transformer.forward(
        params, cfg, tokens, jnp.maximum(pos, 0), valid=pos >= 0, kernel=Kernel("cudnn")
    )
    a, c = np.asarray(ours, np.float32)[valid], np.asarray(fused, np.float32)[valid]
    assert np.isfinite(c).all()
    np.testing.assert_allclose(c, a, atol=5e-2, rtol=5e-2)


def test_pallas_tpu_kernel_equals_ours_forward_and_gradient():
    """The TPU flash-attention kernel, run in Pallas's interpreter on CPU, inside the training forward
    (left-padded prompts, a length that is not a multiple of its blocks): hidden states and the
    parameter gradient equal the XLA path's."""
    cfg = models.tiny()
    params = transformer.init_params(cfg, jax.random.PRNGKey(0))
    b, t = 3, 40
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = np.full((b, t), -1, np.int32)
    for i, start in enumerate((0, 5, 17)):  # left padding, as the trainer lays batches out
        pos[i, start:] = np.arange(t - start)
    valid = jnp.asarray(pos >= 0)
    positions = jnp.maximum(jnp.asarray(pos), 0)

    def loss(p, impl):
        hidden, _ = transformer.forward(p, cfg, tokens, positions, valid=valid, kernel=Kernel(impl))
        return jnp.sum(jnp.where(valid[..., None], hidden, 0.0) ** 2), hidden

    from jax.experimental.pallas import tpu as pltpu

    (l0, h0), g0 = jax.value_and_grad(loss, has_aux=True)(params, "xla")
    with pltpu.force_tpu_interpret_mode():  # tracing and compiling: the kernel runs interpreted
        (l1, h1), g1 = jax.value_and_grad(loss, has_aux=True)(params, "pallas")
    m = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(h1)[m], np.asarray(h0)[m], atol=1e-5, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec, local", [("data=2", (2, 4)), ("tensor=2", (4, 2))])
def test_pallas_kernel_runs_per_device_under_a_mesh(monkeypatch, spec, local):
    """With the forward's mesh the TPU kernel runs under shard_map on each device's own rows (data) or
    heads (tensor): it sees `local` = (rows, heads) of the 4 x 4, so XLA has nothing to gather, and the
    sharded forward and gradient equal the XLA path's. Two devices: Pallas's TPU interpreter runs the
    devices' kernels as concurrent host callbacks, and on this 2-core machine more than two hang."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mllmjax.sharding import make_mesh, mesh_axes, shard_params

    cfg = models.tiny()  # 4 heads, 2 kv heads
    mesh = make_mesh(spec, jax.devices()[:2])
    params = shard_params(transformer.init_params(cfg, jax.random.PRNGKey(0)), cfg, mesh)
    b, t = 4, 24
    pos = np.full((b, t), -1, np.int32)
    for i, start in enumerate((0, 3, 9, 1)):
        pos[i, start:] = np.arange(t - start)
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    tokens = jax.device_put(
        np.random.default_rng(2).integers(0, cfg.vocab_size, (b, t)).astype(np.int32), rows
    )
    valid = jax.device_put(pos >= 0, rows)
    positions = jax.device_put(np.maximum(pos, 0), rows)
    seen = []
    kernel = fa.flash_attention

    def recording(q, *args, **kwargs):
        seen.append(q.shape)
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(fa, "flash_attention", recording)

    def loss(p, impl, mesh=None):
        on = (
            Kernel(impl)
            if mesh is None
            else Kernel(impl, mesh, mesh_axes(mesh, "batch"), mesh_axes(mesh, "heads"))
        )
        hidden, _ = transformer.forward(p, cfg, tokens, positions, valid=valid, kernel=on)
        return jnp.sum(jnp.where(valid[..., None], hidden, 0.0) ** 2), hidden

    (_, h0), g0 = jax.value_and_grad(loss, has_aux=True)(params, "xla")
    with pltpu.force_tpu_interpret_mode():
        (_, h1), g1 = jax.value_and_grad(loss, has_aux=True)(params, "pallas", mesh)
    assert seen and all(shape[:2] == local for shape in seen), seen  # [rows, heads, T, H] per device
    m = pos >= 0
    np.testing.assert_allclose(np.asarray(h1)[m], np.asarray(h0)[m], atol=1e-5, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-4, rtol=1e-4)
