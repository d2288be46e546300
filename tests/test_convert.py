"""convert/export through the library and the CLI: source formats, atomicity, bad input, round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from hf_models import save_hf_model
from typer.testing import CliRunner

from mllmjax.checkpoint import FORMAT, load_checkpoint, read_stop_ids
from mllmjax.convert import convert
from mllmjax.models import transformer
from mllmjax.sharding import make_mesh
from mllmjax_cli.main import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def hf_qwen3(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("src") / "qwen3"
    return folder, save_hf_model("qwen3", folder)


def ref_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, 128, (2, 16))


def test_checkpoint_artifact(hf_qwen3, tmp_path):
    src, _ = hf_qwen3
    result = run("convert", src, "-o", tmp_path / "ck")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "ck/mllmjax.json").read_text())
    assert meta["format"] == FORMAT and meta["family"] == "qwen3" and meta["dtype"] == "float32"
    assert meta["step"] == 0 and meta["parent"] is None and meta["source"] == str(src)
    assert json.loads((tmp_path / "ck/config.json").read_text())["head_dim"] == 24
    assert (tmp_path / "ck/params").is_dir() and (tmp_path / "ck/tokenizer.json").is_file()
    # stop ids: the tokenizer's eos and the chat end token
    assert read_stop_ids(tmp_path / "ck") == [0, 2]
    tok = load_checkpoint(tmp_path / "ck", load_params=False).tokenizer()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("layout", ["sharded-index", "bin", "single-file"])
def test_source_layouts(layout, tmp_path):
    kwargs = {"safe": layout != "bin", "max_shard_size": "20KB" if layout == "sharded-index" else None}
    model = save_hf_model("llama-tied", tmp_path / "hf", **kwargs)
    if layout == "sharded-index":
        assert (tmp_path / "hf/model.safetensors.index.json").is_file()
    if layout == "bin":
        assert (tmp_path / "hf/pytorch_model.bin").is_file()
    source = tmp_path / "hf/model.safetensors" if layout == "single-file" else tmp_path / "hf"
    convert(str(source), tmp_path / "ck")
    ck = load_checkpoint(tmp_path / "ck")
    np.testing.assert_allclose(
        np.asarray(transformer.logits(ck.params, ck.cfg, TOKENS)), ref_logits(model, TOKENS), atol=1e-4
    )


def test_bfloat16_checkpoint(hf_qwen3, tmp_path):
    src, model = hf_qwen3
    convert(str(src), tmp_path / "ck", dtype="bfloat16")
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.params["embed"].dtype == np.dtype("bfloat16")
    # restoring in float32 gives the bf16-rounded weights: logits close, not equal, to the f32 model
    ck32 = load_checkpoint(tmp_path / "ck", dtype="float32")
    diff = np.abs(
        np.asarray(transformer.logits(ck32.params, ck32.cfg, TOKENS)) - ref_logits(model, TOKENS)
    ).max()
    assert 0 < diff < 0.05


def test_restores_onto_a_different_mesh(hf_qwen3, tmp_path):
    src, model = hf_qwen3
    convert(str(src), tmp_path / "ck", mesh=make_mesh("fsdp=2,tensor=4"))
    mesh = make_mesh("data=1,fsdp=4,tensor=2")
    ck = load_checkpoint(tmp_path / "ck", mesh=mesh)
    assert ck.params["layers"]["q"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_allclose(
        np.asarray(transformer.logits(ck.params, ck.cfg, TOKENS)), ref_logits(model, TOKENS), atol=1e-4
    )


def test_export_round_trip_is_exact(hf_qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    src, model = hf_qwen3
    assert run("convert", src, "-o", tmp_path / "ck").exit_code == 0
    result = run("export", tmp_path / "ck", "-o", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    original, exported = model.state_dict(), back.state_dict()
    assert original.keys() == exported.keys()
    for name in original:
        assert torch.equal(original[name], exported[name]), name


def test_export_of_tied_model_stays_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    model = save_hf_model("qwen2-tied", tmp_path / "src")
    convert(str(tmp_path / "src"), tmp_path / "ck")
    assert run("export", tmp_path / "ck", "-o", tmp_path / "hf", "--dtype", "bfloat16").exit_code == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert (
        back.config.tie_word_embeddings
        and back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    )
    assert back.dtype == torch.bfloat16
    np.testing.assert_array_equal(
        back.model.norm.weight.detach().float().numpy(),
        model.model.norm.weight.detach().bfloat16().float().numpy(),
    )


# ---------------------------------------------------------------------------- bad input


def _expect_bad(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


def test_unknown_architecture(tmp_path):
    save_hf_model("qwen2", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (tmp_path / "hf/config.json").write_text(json.dumps(cfg))
    _expect_bad(
        run("convert", tmp_path / "hf", "-o", tmp_path / "ck"), "MistralForCausalLM", "Qwen3ForCausalLM"
    )
    assert not (tmp_path / "ck").exists()


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_model("llama-tied", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf/model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "hf/model.safetensors")
    _expect_bad(run("convert", tmp_path / "hf", "-o", tmp_path / "ck"), "model.layers.1.mlp.up_proj.weight")
    assert not (tmp_path / "ck").exists() and os.listdir(tmp_path) == ["hf"]


def test_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_model("qwen2", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf/model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(5)
    save_file(tensors, tmp_path / "hf/model.safetensors")
    _expect_bad(
        run("convert", tmp_path / "hf", "-o", tmp_path / "ck"), "model.layers.0.self_attn.k_proj.bias", "[5]"
    )


def test_truncated_file(tmp_path):
    save_hf_model("llama-tied", tmp_path / "hf")
    weights = tmp_path / "hf/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    _expect_bad(run("convert", tmp_path / "hf", "-o", tmp_path / "ck"), "truncated")
    assert not (tmp_path / "ck").exists()


def test_existing_output_needs_force(hf_qwen3, tmp_path):
    src, _ = hf_qwen3
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck/keep.txt").write_text("mine")
    _expect_bad(run("convert", src, "-o", tmp_path / "ck"), "--force")
    assert (tmp_path / "ck/keep.txt").read_text() == "mine"
    assert run("convert", src, "-o", tmp_path / "ck", "--force").exit_code == 0
    assert not (tmp_path / "ck/keep.txt").exists() and (tmp_path / "ck/mllmjax.json").is_file()


def test_failed_convert_keeps_existing_output(tmp_path):
    save_hf_model("llama-tied", tmp_path / "hf")
    weights = tmp_path / "hf/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck/keep.txt").write_text("mine")
    _expect_bad(run("convert", tmp_path / "hf", "-o", tmp_path / "ck", "--force"), "truncated")
    assert (tmp_path / "ck/keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["convert", "no/such/dir/x.gguf", "-o", "out"], "no such GGUF file"),
        (["convert", "./missing-folder", "-o", "out"], "not a file, a folder"),
        (["convert", "owner/model", "-o", "out"], "could not fetch 'owner/model'"),
        (["export", "not-a-checkpoint", "-o", "out"], "not an mllmjax checkpoint"),
        (["convert", "smollm2-135m", "-o", "out", "--mesh", "fsdp=3"], "--mesh"),
        (["convert", "smollm2-135m", "-o", "out", "--dtype", "int4"], "unknown dtype"),
    ],
)
def test_bad_arguments(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _expect_bad(run(*args), fragment)
    assert not (tmp_path / "out").exists()


def test_help_lists_all_eight_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("convert", "sample", "rollout", "score", "train", "grpo", "eval", "export"):
        assert command in result.output


def test_help_prose_paragraphs_are_one_line_each():
    """Typer prints a help text's later paragraphs line by line: each prose paragraph is one line (Typer
    wraps it to the terminal), examples and click's \\b paragraphs keep their lines."""
    from mllmjax_cli.helptext import prose
    from mllmjax_cli.main import app

    text = "First\nline.\n\nSecond one\nwraps here.\n\n  mllmjax x\n  mllmjax y\n\n\bkept\nas is\n"
    assert prose(text) == "First line.\n\nSecond one wraps here.\n\n  mllmjax x\n  mllmjax y\n\n\bkept\nas is\n"
    for command in app.registered_commands:
        for paragraph in command.help.split("\n\n"):
            lines = paragraph.split("\n")
            laid_out = paragraph.startswith("\b") or any(line[:1].isspace() for line in lines)
            assert laid_out or len(lines) == 1, (command.name, paragraph)
