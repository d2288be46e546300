"""`mllmjax sample` with images on LLaVA and Gemma 3 vision checkpoints (tiny random models built
offline, `hf_models.make_llava`): greedy decoding matches HF's `generate` token for token (log-probs within
1e-4) on inputs the checkpoint's own processor makes, through the library and the CLI, and bad input
is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hf_models import IMAGE_TOKEN, VLMS, make_llava, make_llava_processor, save_hf_model
from PIL import Image
from typer.testing import CliRunner

from mllmjax.checkpoint import load_checkpoint
from mllmjax.models.vision import vlm
from mllmjax.sampling import generate_embeds, stream
from mllmjax_cli.main import app

runner = CliRunner()
NEW = 32
TOL = 1e-4
# The random LLaVAs' matrices times this: at HF's initial scale a tiny LLaVA repeats one token whatever
# its input; scaled, what it decodes depends on the image and on the tokens before.
SCALE = 8.0


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def write_image(path: Path, seed: int, size: tuple[int, int] = (20, 30)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module", params=sorted(VLMS))
def converted(request, tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """(the HF model, a folder holding hf/ (its save_pretrained with a processor), ck/ (its
    conversion), and images a.png, b.png)."""
    root = tmp_path_factory.mktemp(request.param)
    model = make_llava(request.param)
    scale = 1.0 if "gemma3" in request.param else SCALE  # Gemma's own scaling makes it vary already
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    model.save_pretrained(root / "hf")
    make_llava_processor(model).save_pretrained(root / "hf")
    result = run("convert", root / "hf", "-o", root / "ck", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    write_image(root / "a.png", 0)
    write_image(root / "b.png", 1, (33, 17))
    return model, root


def hf_inputs(root: Path, prompt: str, images: list[str]) -> dict:
    """The chat-templated prompt with one image slot per image before the text, as the CLI builds it."""
    processor = transformers.AutoProcessor.from_pretrained(root / "ck")
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    pictures = [Image.open(root / name) for name in images]
    return processor(text=text, images=pictures or None, return_tensors="pt", add_special_tokens=False)


def hf_greedy(model, inputs) -> tuple[list[int], list[float]]:
    """HF's 32 greedy tokens (no stop) and their log-probs under the raw logits."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    lps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, ids, strict=True)]
    return ids, lps


def until_stop(ids: list[int], stops: set[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in stops:
            return ids[: k + 1]
    return ids


def stop_ids(root: Path) -> set[int]:
    from mllmjax.checkpoint import read_stop_ids, stop_ids_for

    tokenizer = transformers.AutoProcessor.from_pretrained(root / "ck").tokenizer
    return set(stop_ids_for(tokenizer, read_stop_ids(root / "ck")))


def test_greedy_with_an_image_matches_hf_generate(converted):
    model, root = converted
    inputs = hf_inputs(root, "w1 w2", ["a.png"])
    ref_ids, ref_lps = hf_greedy(model, inputs)
    assert len(set(ref_ids)) > 2  # the test model does not just repeat one token

    ckpt = load_checkpoint(root / "ck", vision_language=True)
    ids, pixels = inputs["input_ids"][0].numpy(), inputs["pixel_values"].numpy()
    embeds = vlm.prompt_embeds(ckpt.params, ckpt.cfg, ids, pixels)
    reach = vlm.prompt_reach(ckpt.cfg, ids)  # Gemma 3: the image's tokens see the whole image
    text_params, text_cfg = ckpt.params["text"], ckpt.cfg.text
    [c] = generate_embeds(text_params, text_cfg, [embeds], max_new_tokens=NEW, reach=[reach])
    assert c.ids == ref_ids and c.finish_reason == "length"
    assert np.abs(np.array(c.logprobs) - np.array(ref_lps)).max() <= TOL

    # n samples share the prompt's one prefill: its cache is repeated over their rows
    pair = generate_embeds(text_params, text_cfg, [embeds], n=2, max_new_tokens=NEW, reach=[reach])
    assert [c.ids for c in pair] == [ref_ids, ref_ids]

    chunks = stream(text_params, text_cfg, None, max_new_tokens=NEW, embeds=embeds, reach=reach)
    assert [t for chunk in chunks for t in chunk.ids] == ref_ids

    # the image is read: another image, another completion
    other = hf_inputs(root, "w1 w2", ["b.png"])
    other_ids = other["input_ids"][0].numpy()
    embeds_b = vlm.prompt_embeds(ckpt.params, ckpt.cfg, other_ids, other["pixel_values"].numpy())
    reach_b = [vlm.prompt_reach(ckpt.cfg, other_ids)]
    [b] = generate_embeds(text_params, text_cfg, [embeds_b], max_new_tokens=NEW, reach=reach_b)
    assert b.ids == hf_greedy(model, other)[0] != ref_ids


def test_cli_json_gives_hfs_tokens(converted, tmp_path):
    model, root = converted
    out = tmp_path / "out.jsonl"
    result = run(
        "sample", root / "ck", "--image", root / "a.png", "w1 w2",
        "--greedy", "--max-new-tokens", NEW, "--json", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    ref_ids, ref_lps = hf_greedy(model, hf_inputs(root, "w1 w2", ["a.png"]))
    want = until_stop(ref_ids, stop_ids(root))
    assert record["completion_ids"] == want
    assert np.abs(np.array(record["logprobs"]) - np.array(ref_lps[: len(want)])).max() <= TOL
    assert record["prompt"] == "w1 w2" and record["images"] == [str(root / "a.png")]
    assert (
        record["prompt_ids"].count(IMAGE_TOKEN)
        == load_checkpoint(root / "ck", vision_language=True, load_params=False).cfg.tokens_per_image
    )
    assert record["finish_reason"] == ("stop" if len(want) < NEW else "length")
    # one prompt on a terminal streams the same completion as text
    streamed = run(
        "sample", root / "ck", "--image", root / "a.png", "w1 w2", "--greedy", "--max-new-tokens", NEW
    )
    assert streamed.exit_code == 0, streamed.output
    assert record["completion"] and record["completion"] in streamed.stdout


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_prompts_file_with_several_images_and_lengths(converted, tmp_path):
    """A batch of prompts of different lengths (padded together), one with two images, one with its
    image slot written in its text, one without an image: each gives what HF gives for it alone."""
    model, root = converted
    (tmp_path / "pics").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "pics" / name).write_bytes((root / name).read_bytes())
    lines = [
        {"prompt": "w1 w2", "images": ["pics/a.png", "pics/b.png"]},
        {"prompt": "<image>\nw3 w4 w5 w6 w7 w8 w9", "images": ["pics/b.png"]},
        {"prompt": "w9 w8"},
    ]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    result = run(
        "sample", root / "ck", "--prompts", prompts, "--greedy", "--max-new-tokens", NEW, "--json", "-o", out
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    processor = transformers.AutoProcessor.from_pretrained(root / "ck")
    stops = stop_ids(root)
    for line, record in zip(lines, records, strict=True):
        images = [root / Path(p).name for p in line.get("images", [])]
        if line["prompt"].startswith("<image>"):
            text = processor.apply_chat_template(
                [{"role": "user", "content": line["prompt"]}], add_generation_prompt=True, tokenize=False
            )
            inputs = processor(
                text=text,
                images=[Image.open(p) for p in images],
                return_tensors="pt",
                add_special_tokens=False,
            )
        else:
            inputs = hf_inputs(root, line["prompt"], [p.name for p in images])
        assert record["prompt_ids"] == inputs["input_ids"][0].tolist()
        assert record["completion_ids"] == until_stop(hf_greedy(model, inputs)[0], stops), line


def _expect_bad(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_bad_images_are_one_line_and_write_nothing(converted, tmp_path):
    _, root = converted
    ck, out = root / "ck", tmp_path / "out.jsonl"
    (tmp_path / "broken.png").write_text("not an image")
    _expect_bad(
        run("sample", ck, "--image", tmp_path / "missing.png", "w1", "-o", out), "missing.png", "no such"
    )
    _expect_bad(
        run("sample", ck, "--image", tmp_path / "broken.png", "w1", "-o", out), "broken.png", "not a readable"
    )
    two = tmp_path / "two.jsonl"
    two.write_text(
        json.dumps({"prompt": "<image> w1", "images": [str(root / "a.png"), str(root / "b.png")]}) + "\n"
    )
    _expect_bad(run("sample", ck, "--prompts", two, "-o", out), "1 image slot", "2 images")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w1", "images": "a.png"}) + "\n")
    _expect_bad(run("sample", ck, "--prompts", bad, "-o", out), "images")
    _expect_bad(run("sample", ck, "--image", root / "a.png", "w1", "w2", "-o", out), "--image", "one PROMPT")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "broken.png", "two.jsonl"]


def test_image_on_a_text_checkpoint_is_refused(tmp_path):
    save_hf_model("llama-tied", tmp_path / "hf")
    assert run("convert", tmp_path / "hf", "-o", tmp_path / "ck", "--dtype", "float32").exit_code == 0
    write_image(tmp_path / "a.png", 0)
    out = tmp_path / "out.jsonl"
    result = run("sample", tmp_path / "ck", "--image", tmp_path / "a.png", "w1", "-o", out)
    _expect_bad(result, f"{tmp_path / 'ck'} is a text model; --image needs a vision-language checkpoint")
    assert not out.exists()
