"""Sharded == unsharded on 8 fake CPU devices, mesh specs, and the logical-axis rules."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mllmjax import models
from mllmjax.errors import BadInputError
from mllmjax.models import transformer
from mllmjax.sharding import ShardingRules, make_mesh, parse_mesh_spec, place_rows, shard_params


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "spec",
    ["data=1,fsdp=-1,tensor=1", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4", "data=8",
     "data=1,fsdp=2,expert=4", "expert=2,tensor=4"],
)  # fmt: skip
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_sharded_logits_equal_unsharded(spec, family):
    # sizes divisible by the mesh, so every rule really shards
    extra = {"num_experts": 8, "moe_intermediate_size": 32} if family == "qwen3_moe" else {}
    cfg = models.tiny(
        family, num_heads=8, num_kv_heads=4, vocab_size=256, hidden_size=64, intermediate_size=128, **extra
    )
    params = transformer.init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 12))
    expected = np.asarray(transformer.logits(params, cfg, tokens))
    mesh = make_mesh(spec)
    sharded = shard_params(params, cfg, mesh)
    placed = place_rows(tokens, mesh)
    got = transformer.logits(sharded, cfg, placed)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)
    if mesh.shape["tensor"] > 1:
        assert sharded["layers"]["q"].sharding.spec == P(
            None, "fsdp" if mesh.shape["fsdp"] > 1 else None, "tensor", None
        )
    if family == "qwen3_moe" and mesh.shape["expert"] > 1:  # experts over expert, D over fsdp, F over tensor
        fsdp, tensor = (a if mesh.shape[a] > 1 else None for a in ("fsdp", "tensor"))
        assert sharded["layers"]["experts_gate"].sharding.spec == P(None, "expert", fsdp, tensor)


def test_indivisible_dimension_is_replicated_not_an_error():
    cfg = models.tiny("llama", num_heads=3, num_kv_heads=1, head_dim=16)
    mesh = make_mesh("tensor=2,fsdp=4")
    sharded = shard_params(transformer.init_params(cfg, jax.random.key(0)), cfg, mesh)
    assert sharded["layers"]["q"].sharding.spec == P(None, "fsdp", None, None)  # 3 heads over tensor=2


def test_mesh_spec_parsing():
    assert parse_mesh_spec("fsdp=-1", 8) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    assert parse_mesh_spec("data=2,fsdp=-1,tensor=2", 8) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert parse_mesh_spec("fsdp=2,expert=-1", 8) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    for bad, fragment in [
        ("pipe=2", "AXIS=SIZE"),
        ("data=2,data=4", "twice"),
        ("fsdp=-1,data=-1", "at most one"),
        ("fsdp=3", "uses 3 devices"),
        ("data=x", "integer"),
        ("data=3,fsdp=-1", "not divisible"),
    ]:
        with pytest.raises(BadInputError, match=fragment):
            parse_mesh_spec(bad, 8)


def test_rules_reject_two_logical_axes_on_one_mesh_axis():
    rules = ShardingRules({"embed": "fsdp", "mlp": "fsdp"})
    with pytest.raises(ValueError, match="both map to mesh axis 'fsdp'"):
        rules.spec((8, 8), ("embed", "mlp"), make_mesh("fsdp=8"))
    with pytest.raises(ValueError, match="unknown mesh axis"):
        ShardingRules({"embed": "pipeline"})
