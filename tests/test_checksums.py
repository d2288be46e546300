"""Checksums of checkpoint arrays: the sums against a numpy reference, independence of sharding, and
loading a damaged checkpoint (the error names the array; --no-verify / MLLMJAX_NO_VERIFY skip it)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hf_models import save_hf_model
from jax.sharding import NamedSharding, PartitionSpec

from mllmjax import checksums
from mllmjax.checkpoint import load_checkpoint
from mllmjax.convert import convert
from mllmjax.errors import ArtifactError


def reference(a: np.ndarray) -> str:
    """The two sums computed independently in numpy (uint64 arithmetic, then mod 2^32)."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        bits = a.astype(np.uint64).reshape(-1)
    else:
        bits = (
            a.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]).astype(np.uint64)
        )
    i = np.arange(bits.size, dtype=np.uint64)
    rot = ((bits << 13) | (bits >> 19)) & 0xFFFFFFFF
    s1 = int((bits * (2 * i + 1) % 2**32).sum() % 2**32)
    s2 = int((rot * (((i * 0x9E3779B1) % 2**32) | 1) % 2**32).sum() % 2**32)
    return f"{s1:08x}{s2:08x}"


def test_sums_equal_numpy_for_every_dtype():
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.normal(size=(7, 33)).astype(np.float32),
        "bf16": rng.normal(size=(5, 3, 4)).astype(ml_dtypes.bfloat16),
        "f16": rng.normal(size=(11,)).astype(np.float16),
        "i32": rng.integers(-(2**31), 2**31 - 1, size=(9,), dtype=np.int32),
        "u8": rng.integers(0, 255, size=(6,), dtype=np.uint8),
        "flag": np.array([True, False, True]),
        "scalar": np.float32(3.5),
        "nested": {"list": [np.arange(4, dtype=np.int32)]},
    }
    got = checksums.tree_checksums(jax.tree.map(jnp.asarray, tree))
    want = {"f32": reference(tree["f32"]), "bf16": reference(tree["bf16"]), "f16": reference(tree["f16"]),
            "i32": reference(tree["i32"]), "u8": reference(tree["u8"]), "flag": reference(tree["flag"]),
            "scalar": reference(np.asarray(tree["scalar"])), "nested/list/0": reference(tree["nested"]["list"][0])}  # fmt: skip
    assert got == want


def test_any_changed_or_swapped_element_changes_both_sums():
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    base = checksums.tree_checksums({"x": x})["x"]
    for flip in (0, 1, 2**22, 2**31):  # one bit of one element, low to sign
        y = x.copy()
        y.view(np.uint32)[17, 3] ^= np.uint32(flip or 1)
        changed = checksums.tree_checksums({"x": y})["x"]
        assert changed[:8] != base[:8] and changed[8:] != base[8:], flip
    swapped = x.copy()
    swapped[[2, 40]] = swapped[[40, 2]]
    assert checksums.tree_checksums({"x": swapped})["x"] != base


def test_the_sums_do_not_depend_on_the_sharding():
    assert len(jax.devices()) >= 8, "conftest sets 8 fake devices"
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    x = np.random.default_rng(2).normal(size=(16, 24)).astype(np.float32)
    one = checksums.tree_checksums({"x": jnp.asarray(x)})
    for spec in (PartitionSpec("a", "b"), PartitionSpec(None, ("a", "b")), PartitionSpec("b")):
        sharded = jax.device_put(x, NamedSharding(mesh, spec))
        assert checksums.tree_checksums({"x": sharded}) == one, spec


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sums")
    save_hf_model("qwen2", folder / "hf", seed=3)
    convert(str(folder / "hf"), folder / "ck")
    return folder / "ck"


def _damage(ckpt, tmp_path):
    import shutil

    copy = tmp_path / "ck"
    shutil.copytree(ckpt, copy)
    data = max((copy / "params").rglob("d/*"), key=lambda f: (f.stat().st_size, f.name))
    with data.open("r+b") as f:
        f.seek(data.stat().st_size // 2)
        f.write(b"\x55" * 64)
    return copy


def test_convert_records_a_checksum_of_every_parameter(ckpt):
    meta = json.loads((ckpt / "mllmjax.json").read_text())
    params = load_checkpoint(ckpt).params
    assert meta["checksums"]["algorithm"] == checksums.ALGORITHM
    assert meta["checksums"]["params"] == {
        checksums.leaf_name(path): reference(np.asarray(x))
        for path, x in jax.tree_util.tree_leaves_with_path(params)
    }


def test_a_damaged_file_is_refused_naming_the_array(ckpt, tmp_path, monkeypatch):
    damaged = _damage(ckpt, tmp_path)
    with pytest.raises(ArtifactError, match=r"params: array \S+ does not match its checksum") as named:
        load_checkpoint(damaged)
    with pytest.raises(ArtifactError, match="does not match its checksum"):  # verified before a cast too
        load_checkpoint(damaged, dtype=jnp.bfloat16)
    monkeypatch.setenv(checksums.VERIFY_ENV, "1")
    loaded = dict(_named(load_checkpoint(damaged).params))  # loads what is there
    good = dict(_named(load_checkpoint(ckpt).params))
    differ = [name for name in good if not np.array_equal(good[name], loaded[name])]
    assert len(differ) == 1 and f"array {differ[0]} does not" in str(named.value)  # the one the error names


def _named(params):
    return [
        (checksums.leaf_name(path), np.asarray(x)) for path, x in jax.tree_util.tree_leaves_with_path(params)
    ]


def test_a_cast_after_verification_equals_a_direct_cast(ckpt, monkeypatch):
    verified = load_checkpoint(ckpt, dtype=jnp.bfloat16).params
    monkeypatch.setenv(checksums.VERIFY_ENV, "1")
    direct = load_checkpoint(ckpt, dtype=jnp.bfloat16).params
    for a, b in zip(jax.tree.leaves(verified), jax.tree.leaves(direct), strict=True):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_without_checksums_still_loads(ckpt, tmp_path):
    """Checkpoints written before checksums existed load unverified."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    meta = json.loads((old / "mllmjax.json").read_text())
    del meta["checksums"]
    (old / "mllmjax.json").write_text(json.dumps(meta))
    assert load_checkpoint(old).params is not None
