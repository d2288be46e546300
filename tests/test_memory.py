"""The memory estimate (mllmjax.memory) against XLA's own buffer assignment and the real arrays."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllmjax import memory
from mllmjax.errors import BadInputError
from mllmjax.loss import LossConfig
from mllmjax.models import transformer
from mllmjax.models.llama import LlamaConfig
from mllmjax.models.qwen3_moe import Qwen3MoeConfig
from mllmjax.optim import OptimConfig
from mllmjax.sampling.buckets import decode_windows
from mllmjax.sharding import make_mesh, shard_params
from mllmjax.trainer import Batch, TrainConfig, Trainer

CFG = LlamaConfig(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=64,
)  # fmt: skip


MOE = Qwen3MoeConfig(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=192,
)  # fmt: skip


MIXED = dataclasses.replace(MOE, mlp_only_layers=(0, 2))


def _float_bytes(tree) -> int:
    """Bytes of the floating-point arrays (the optimizer's step counters are not parameter-sized)."""
    return sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
    )


def _update_setup(cfg, remat: str, b: int, t: int, p: int):
    """(train config, trainer, state, batch) of one update on b rows of t tokens whose last t - p are
    the completion; every row's prompt is the same (zeros), as `prompt_rows` may then claim."""
    tcfg = TrainConfig(
        loss=LossConfig(beta=0.0), optim=OptimConfig(name="adamw", total_updates=10), remat=remat
    )
    trainer = Trainer(cfg, tcfg)
    state = trainer.init_state(transformer.init_params(cfg, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    completion = np.zeros((b, t), bool)
    completion[:, p:] = True
    batch = Batch(
        tokens=jnp.zeros((b, t), jnp.int32), positions=jnp.broadcast_to(jnp.arange(t), (b, t)),
        valid=jnp.ones((b, t), bool), completion=jnp.asarray(completion), advantages=jnp.ones(b),
        completion_start=p,
    )  # fmt: skip
    return tcfg, trainer, state, batch


@pytest.mark.parametrize("remat", ["none", "nothing_saveable", "dots_saveable"])
@pytest.mark.parametrize("cfg, b", [(CFG, 8), (MOE, 16)], ids=["dense", "moe"])
def test_training_estimate_tracks_xla(remat, cfg, b):
    """Also a mixture of experts (its rows, expert outputs, router and the experts' workspace in
    place of an MLP's activations), at 16 rows: at 8 its nothing_saveable estimate is 1.25x XLA's."""
    _check_training_estimate(remat, cfg, b)


def test_mixed_layers_estimate_tracks_xla():
    """Dense MLPs in layers 0 and 2 of the MoE (their weights in a stack of their own): unrolled, its
    nothing_saveable update peaks where one without remat does, and the estimate says so."""
    _check_training_estimate("nothing_saveable", MIXED, 16)


def _check_training_estimate(remat, cfg, b):
    t, p = 256, 64
    tcfg, trainer, state, batch = _update_setup(cfg, remat, b, t, p)
    xla = jax.jit(trainer._update).lower(state, batch).compile().memory_analysis()
    est = memory.for_train_config(
        cfg, tcfg, rows=b, seq_len=t, completion_len=t - p, param_dtype="float32", mesh=None
    )
    # Parameters and optimizer slots are exact: they are the state's own arrays.
    assert est.parts["params"] + est.parts["optimizer"] == _float_bytes((state.params, state.opt_state))
    peak = xla.argument_size_in_bytes + xla.temp_size_in_bytes + xla.output_size_in_bytes
    assert 0.8 <= est.total / peak <= 1.25, (remat, est.describe(), peak)
    # Donated, the new state takes the old one's buffers (XLA counts them as aliased).
    xla = jax.jit(trainer._update, donate_argnums=(0,)).lower(state, batch).compile().memory_analysis()
    est = memory.for_train_config(
        cfg, tcfg, rows=b, seq_len=t, completion_len=t - p, param_dtype="float32", mesh=None, donated=True
    )
    assert est.parts["new state"] == 0 and xla.alias_size_in_bytes > 0
    peak = (
        xla.argument_size_in_bytes
        + xla.temp_size_in_bytes
        + xla.output_size_in_bytes
        - xla.alias_size_in_bytes
    )
    assert 0.8 <= est.total / peak <= 1.25, (remat, est.describe(), peak)


@pytest.mark.parametrize("remat", ["none", "nothing_saveable"])
def test_shared_prompt_estimate_tracks_xla(remat):
    """One prompt of 256 tokens shared by 16 rows of 128 completion tokens: the update runs 256 + 16 x
    128 tokens, not 16 x 384, and the estimate follows XLA's peak down."""
    b, t, p = 16, 384, 256
    tcfg, trainer, state, batch = _update_setup(CFG, remat, b, t, p)
    peaks = {}
    for rows in (1, b):  # per row, then shared
        xla = (
            jax.jit(trainer._update).lower(state, batch.replace(prompt_rows=rows)).compile().memory_analysis()
        )
        peaks[rows] = xla.argument_size_in_bytes + xla.temp_size_in_bytes + xla.output_size_in_bytes
        est = memory.for_train_config(
            CFG,
            tcfg,
            rows=b,
            seq_len=t,
            completion_len=t - p,
            param_dtype="float32",
            mesh=None,
            prompt_rows=rows,
        )
        assert 0.8 <= est.total / peaks[rows] <= 1.25, (remat, rows, est.describe(), peaks[rows])
    assert peaks[b] < peaks[1]


def test_sharded_params_per_device():
    mesh = make_mesh("fsdp=4,tensor=2")
    params = shard_params(transformer.init_params(CFG, jax.random.PRNGKey(0)), CFG, mesh)
    per_device = max(
        sum(
            s.data.nbytes
            for leaf in jax.tree.leaves(params)
            for s in leaf.addressable_shards
            if s.device == d
        )
        for d in mesh.devices.flat
    )
    assert memory.param_bytes_per_device(CFG, "float32", mesh) == per_device
    assert memory.param_bytes_per_device(CFG, "bfloat16", {"fsdp": 1}) == CFG.num_params() * 2


def test_expert_sharded_params_per_device():
    """Experts over the expert axis (and their hidden dimension over fsdp), to the byte."""
    mesh = make_mesh("fsdp=2,expert=4")
    params = shard_params(transformer.init_params(MOE, jax.random.PRNGKey(0)), MOE, mesh)
    device = mesh.devices.flat[0]
    per_device = sum(
        s.data.nbytes
        for leaf in jax.tree.leaves(params)
        for s in leaf.addressable_shards
        if s.device == device
    )
    assert memory.param_bytes_per_device(MOE, "float32", mesh) == per_device
    experts = 3 * 4 * 8 * 256 * 192 * 4  # gate, up, down of 4 layers of 8 experts, float32
    assert params["layers"]["experts_up"].addressable_shards[0].data.nbytes == experts // 3 // 8
    # The update's estimate: rows over fsdp x expert, one layer's experts gathered whole on a device.
    est = memory.estimate_training(MOE, rows=16, seq_len=128, mesh=mesh, backend="cpu")
    single = memory.estimate_training(MOE, rows=16, seq_len=128, backend="cpu")
    assert est.parts["activations"] * 8 == single.parts["activations"]
    layer = experts // 4
    cotangents = 16 * 128 * 4 * (2 * 2.5 + 2) * 256  # of one layer's rows (2 x 1.25 per token) and outputs
    assert single.parts["experts"] == cotangents + layer  # + float32 gradient accumulators of one layer
    assert est.parts["experts"] == cotangents + 2 * layer  # + its experts gathered (float32 compute)


def test_sampling_estimate_counts_the_kv_cache():
    est = memory.estimate_sampling(CFG, rows=16, cache_len=512, param_dtype="bfloat16")
    assert est.parts["kv_cache"] == 2 * 4 * 16 * 512 * 2 * 64 * 2
    halved = memory.estimate_sampling(CFG, rows=16, cache_len=512, param_dtype="bfloat16", mesh={"data": 2})
    assert halved.parts["kv_cache"] == est.parts["kv_cache"] // 2
    # A cache that grows through windows holds two of them while it grows: 384 + 512 slots at most.
    windows = decode_windows(0, 512)
    assert windows == (128, 256, 384, 512)
    grown = memory.estimate_sampling(CFG, rows=16, cache_len=windows, param_dtype="bfloat16")
    assert grown.parts["kv_cache"] == est.parts["kv_cache"] * (384 + 512) // 512
    # The CPU decode loop's output-major copy of the layer matrices: q, o (256 x 4*64), k, v
    # (256 x 2*64), gate, up, down (256 x 768), per layer, in the parameter dtype.
    assert "decode_weights" not in est.parts
    cpu = memory.estimate_sampling(CFG, rows=16, cache_len=512, param_dtype="bfloat16", out_major=True)
    assert cpu.parts["decode_weights"] == 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 768) * 2
    assert cpu.total == est.total + cpu.parts["decode_weights"]


def test_sampling_estimate_counts_ring_slots_of_windowed_layers():
    """A sliding-window layer keeps a ring of min(W, length) slots: the estimate equals the bytes of
    the cache `init_cache` builds, and the layers sliced for the per-layer decode loop are counted."""
    from mllmjax.models.cache import init_cache
    from mllmjax.models.gemma3 import Gemma3Config

    cfg = Gemma3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=2,
        num_kv_heads=1, head_dim=32, sliding_window=64,
    )  # fmt: skip
    assert cfg.layer_windows() == (64,) * 5 + (None,)
    for length in (32, 512):
        est = memory.estimate_sampling(cfg, rows=4, cache_len=length, param_dtype="bfloat16")
        cache = init_cache(cfg, 4, length, jnp.bfloat16)
        assert est.parts["kv_cache"] == sum(x.nbytes for x in (*cache.k, *cache.v))
    assert est.parts["kv_cache"] == 2 * 4 * (5 * 64 + 512) * 32 * 2
    layers = sum(x.nbytes for x in jax.tree.leaves(transformer.init_params(cfg, jax.random.key(0))["layers"]))
    assert est.parts["decode_weights"] == layers // 2  # float32 init, bfloat16 estimate


def test_check_refuses_what_cannot_fit(monkeypatch):
    est = memory.MemoryEstimate({"params": 3 * 10**9, "activations": 2 * 10**9}, available=4 * 10**9)
    assert est.describe() == (
        "memory per device: params 3.00 GB + activations 2.00 GB = 5.00 GB of 4.0 GB available"
    )
    with pytest.raises(BadInputError, match=r"needs about 5.0 GB per device .* 4.0 GB is available; try"):
        est.check("try less")
    monkeypatch.setenv("MLLMJAX_MEMORY_CHECK", "0")
    est.check("try less")  # the user's override
    memory.MemoryEstimate({"params": 1}, available=None).check("unknown limit: nothing to refuse")


def test_available_bytes_on_cpu():
    avail = memory.available_bytes()
    assert avail is not None and 0 < avail < 10**13


def test_with_process_adds_the_runtime_beside_the_arrays_on_the_cpu(monkeypatch):
    """On the CPU the estimate adds the process's resident memory beyond the arrays it already counts
    (a replicated array once per device), and that memory counts as available: it is the process's."""
    devices = jax.local_device_count()
    params = jnp.ones((1000,), jnp.float32)  # 4000 bytes on one device
    everywhere = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.local_devices()), ("d",)), jax.sharding.PartitionSpec()
    )
    replicated = jax.device_put(jnp.ones((10,), jnp.float32), everywhere)
    monkeypatch.setattr(memory, "_resident_bytes", lambda: 10**6)
    est = memory.MemoryEstimate({"params": 4000}, available=5 * 10**6)
    out = memory.with_process(est, {"p": params, "r": replicated, "n": 3})
    assert out.parts == {"params": 4000, "runtime": (10**6 - 4000 - 40 * devices) // devices}
    assert out.available == 5 * 10**6 + 10**6 // devices
    assert memory.with_process(memory.MemoryEstimate({"params": 1}, None), None).available is None
    monkeypatch.setattr(memory, "_resident_bytes", lambda: None)  # no /proc: as it was
    assert memory.with_process(est, params) is est
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # accelerator memory holds arrays only
    monkeypatch.setattr(memory, "_resident_bytes", lambda: 10**6)
    assert memory.with_process(est, params) is est
