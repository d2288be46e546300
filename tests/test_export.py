"""`export` in the layouts the round-trip test in test_convert.py does not reach: sharded safetensors with
an index (forced with a small max_shard_bytes) and float16 output, each read back by the safetensors
package and by transformers and compared with the source model bit for bit."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import save_hf_model
from safetensors import safe_open
from typer.testing import CliRunner

from mllmjax.convert import MAX_SHARD_BYTES, convert, export
from mllmjax.errors import BadInputError
from mllmjax_cli.main import app

TOKENS = np.random.default_rng(0).integers(0, 128, (2, 16))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """(float32 checkpoint, the transformers model it was converted from)."""
    base = tmp_path_factory.mktemp("export")
    model = save_hf_model("qwen3", base / "hf")
    convert(str(base / "hf"), base / "ck", dtype="float32")
    return base / "ck", model


def _files_and_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of folder -> its tensors, read by the safetensors package (not ours)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            names = st.keys()
            out[f.name] = {name: st.get_tensor(name) for name in names}
    return out


def _load_hf(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
    # transformers only warns about missing or unexpected tensors (and initialises the missing ones
    # at random): a dropped tensor must fail here.
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def test_default_shard_size_is_2_gib():
    assert MAX_SHARD_BYTES == 2 * 1024**3
    assert inspect.signature(export).parameters["max_shard_bytes"].default == MAX_SHARD_BYTES


def test_sharded_export_has_an_exact_index_and_loads_in_transformers(qwen3, tmp_path):
    ck, model = qwen3
    original = model.state_dict()
    nbytes = {name: t.numel() * t.element_size() for name, t in original.items()}
    limit = 20_000  # the embedding and LM head (128 x 48 float32 = 24,576 bytes) exceed it: shards of one
    assert max(nbytes.values()) > limit and sum(nbytes.values()) > 5 * limit
    result = export(ck, tmp_path / "hf", max_shard_bytes=limit)
    out = tmp_path / "hf"

    shards = _files_and_tensors(out)
    n = len(shards)
    assert n >= 5 and not (out / "model.safetensors").exists()
    assert sorted(shards) == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert {f for f in result.files if f.endswith(".safetensors")} == set(shards)
    # Each file holds at most `limit` bytes of tensors, unless it holds a single larger tensor.
    for fname, tensors in shards.items():
        size = sum(nbytes[name] for name in tensors)
        assert size <= limit or len(tensors) == 1, (fname, size)
    # Every tensor of the source model is in exactly one file, bit-exact.
    located = [(name, fname) for fname, tensors in shards.items() for name in tensors]
    assert sorted(name for name, _ in located) == sorted(original)
    for tensors in shards.values():
        for name, t in tensors.items():
            assert t.dtype == torch.float32 and torch.equal(t, original[name]), name
    # The index: every tensor once, naming the file that holds it, and the total byte count.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == dict(located)
    assert index["metadata"]["total_size"] == sum(nbytes.values())
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary shard left

    back = _load_hf(out, dtype=torch.float32)
    exported = back.state_dict()
    assert exported.keys() == original.keys()
    for name in original:
        assert torch.equal(exported[name], original[name]), name
    np.testing.assert_array_equal(_logits(back), _logits(model))


def test_unsharded_below_the_limit(qwen3, tmp_path):
    ck, model = qwen3
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    export(ck, tmp_path / "hf", max_shard_bytes=total)  # exactly fits: one file, no index
    assert sorted(p.name for p in tmp_path.joinpath("hf").glob("model*")) == ["model.safetensors"]
    with pytest.raises(BadInputError, match="max_shard_bytes"):
        export(ck, tmp_path / "bad", max_shard_bytes=0)
    assert not (tmp_path / "bad").exists()


def test_float16_export_is_torch_half_of_the_weights(qwen3, tmp_path):
    """`--dtype float16` writes F16 tensors equal bit for bit to torch's round-to-nearest-even
    `.half()` of the float32 weights; transformers loads them as a float16 model."""
    ck, model = qwen3
    result = CliRunner().invoke(app, ["export", str(ck), "-o", str(tmp_path / "hf"), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "hf"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    want = {name: t.half() for name, t in model.state_dict().items()}
    # Sanity: float16 rounding changes the weights, and not the way bfloat16 rounding would.
    w = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w.half().float(), w)
    assert not torch.equal(w.half().float(), w.bfloat16().float())
    (tensors,) = _files_and_tensors(out).values()
    assert tensors.keys() == want.keys()
    for name, t in tensors.items():
        assert t.dtype == torch.float16 and torch.equal(t, want[name]), name

    back = _load_hf(out)  # the config's dtype
    assert back.dtype == torch.float16
    exported = back.state_dict()
    assert exported.keys() == want.keys()
    for name in want:
        assert torch.equal(exported[name], want[name]), name
