"""LLaVA and Gemma 3 with vision through `convert` and `export` (tiny random models built offline, `hf_models.save_llava`): the
converted params are the loader's and give HF's logits, convert -> export -> from_pretrained is
bit-exact (every tensor, the ones no forward reads included) with the processor files carried, and
export refuses the LoRA flags on one (the other commands run it: tests/test_vision_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from hf_models import VLMS, save_llava
from PIL import Image
from typer.testing import CliRunner

from mllmjax.checkpoint import load_checkpoint
from mllmjax.models.vision import vlm
from mllmjax.weights.hf import PROCESSOR_FILES, TOKENIZER_FILES
from mllmjax_cli.main import app

runner = CliRunner()
TOL = 1e-4


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module", params=sorted(VLMS))
def converted(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path]:
    """(name, the HF model, a folder holding hf/ (its save_pretrained with a processor), ck/ (its
    conversion) and out/ (the export of ck/))."""
    root = tmp_path_factory.mktemp(request.param)
    model = save_llava(request.param, root / "hf")
    result = run("convert", root / "hf", "-o", root / "ck", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert ("gemma3_vision" if "gemma3" in request.param else "llava") in result.output
    result = run("export", root / "ck", "-o", root / "out")
    assert result.exit_code == 0, result.output
    return request.param, model, root


def _side_files(folder: Path) -> set[str]:
    return {f for f in (*TOKENIZER_FILES, *PROCESSOR_FILES) if (folder / f).is_file()}


def test_checkpoint_holds_the_loaders_params_and_the_processor_files(converted):
    _, _, root = converted
    meta = json.loads((root / "ck/mllmjax.json").read_text())
    assert meta["family"] in ("llava", "gemma3_vision") and meta["dtype"] == "float32"
    assert "params" in meta["checksums"]
    ckpt = load_checkpoint(root / "ck", vision_language=True)
    cfg, params = vlm.load_hf(root / "hf")
    assert ckpt.cfg == cfg
    assert jax.tree.structure(ckpt.params) == jax.tree.structure(params)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), ckpt.params, params))
    carried = _side_files(root / "hf")
    assert {"processor_config.json", "tokenizer.json", "chat_template.jinja"} <= carried
    assert carried <= _side_files(root / "ck")
    assert (root / "ck/generation_config.json").is_file()


def test_converted_logits_match_hf_with_an_image(converted):
    """The export's processor makes the inputs (a prompt with an image); the checkpoint's params give
    the HF model's logits for them."""
    _, model, root = converted
    from mllmjax.images import slot_token

    processor = transformers.AutoProcessor.from_pretrained(root / "out")
    pixels = np.random.default_rng(0).integers(0, 256, (37, 41, 3), dtype=np.uint8)
    text = f"w1 w2 {slot_token(processor)} w3 hi"
    inputs = processor(text=text, images=Image.fromarray(pixels), return_tensors="pt")
    ckpt = load_checkpoint(root / "ck", vision_language=True)
    ids, pixel_values = inputs["input_ids"].numpy(), inputs["pixel_values"].numpy()
    assert (ids == ckpt.cfg.image_token_id).sum() == ckpt.cfg.tokens_per_image
    ours = np.asarray(vlm.logits(ckpt.params, ckpt.cfg, ids, pixel_values))
    with torch.no_grad():
        ref = model(**inputs).logits.numpy()  # Gemma 3's token_type_ids among them
    assert np.abs(ours - ref).max() <= TOL


def test_export_round_trip_is_exact(converted):
    name, model, root = converted
    cls = type(model)  # LlavaForConditionalGeneration, Gemma3ForConditionalGeneration
    back = cls.from_pretrained(root / "out", dtype=torch.float32)
    original, exported = model.state_dict(), back.state_dict()
    assert original.keys() == exported.keys()
    # the tensors the forward does not read come back too
    unused = {"clip-llama": ".post_layernorm.", "siglip-qwen2": ".head.", "siglip-gemma3": None}[name]
    assert unused is None or any(unused in n for n in original)
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    tied = model.config.to_dict()["text_config"]["tie_word_embeddings"]
    assert back.config.to_dict()["text_config"]["tie_word_embeddings"] == tied
    assert _side_files(root / "hf") <= _side_files(root / "out")
    assert {p.name for p in (root / "out").iterdir()} >= {"config.json", "model.safetensors"}


def test_export_refuses_lora_flags_on_a_checkpoint_without_adapters(converted, tmp_path):
    _, _, root = converted
    for flag in ("--merge", "--adapter"):
        _expect_bad(run("export", root / "ck", "-o", tmp_path / "x", flag), "holds no LoRA adapters", flag)
    assert not (tmp_path / "x").exists()


def _expect_bad(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output




def test_convert_refuses_a_gguf_vision_projector(tmp_path):
    """llama.cpp keeps a LLaVA's tower and projector in an mmproj file of architecture "clip"."""
    import gguf

    path = tmp_path / "mmproj.gguf"
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_tensor("v.patch_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _expect_bad(run("convert", path, "-o", tmp_path / "ck"), "GGUF vision", "LlavaForConditionalGeneration")
    assert not (tmp_path / "ck").exists()
