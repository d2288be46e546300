"""`mllmjax rollout` and `score` with images, on a tiny LLaVA built offline (the `converted` fixture of
test_vision_sample): the visual built-in tasks give mllmjax.rollout/2 records with their pictures' hashes
and G samples per prompt; greedy completions equal HF's `generate` on the same prompt ids and pixels;
score keeps /2 and refuses an image that changed; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import transformers
from hf_models import IMAGE_TOKEN, save_hf_model
from PIL import Image
from test_vision_sample import (  # noqa: F401  (converted: the fixture, reused)
    NEW,
    TOL,
    _expect_bad,
    converted,
    hf_greedy,
    run,
    stop_ids,
    until_stop,
    write_image,
)

from mllmjax.checkpoint import load_checkpoint

G = 3


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def count_rollout(converted, tmp_path_factory) -> tuple[Path, Path]:  # noqa: F811
    """(the checkpoint folder, r.jsonl: builtin:count rollouts, 2 prompts x G, sampled)."""
    _, root = converted
    out = tmp_path_factory.mktemp("count") / "r.jsonl"
    result = run(
        "rollout", root / "ck", "--data", "builtin:count", "--num-prompts", 2, "-G", G,
        "--max-new-tokens", 8, "--seed", 3, "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root, out


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_builtin_count_rollout_writes_schema_2_with_the_pictures_hashes(count_rollout):
    root, out = count_rollout
    from mllmjax.data import load_problems

    problems = load_problems("builtin:count", num=2, image_dir=out.parent / "again")
    lines = records(out)
    assert len(lines) == 2 * G
    per_image = load_checkpoint(root / "ck", vision_language=True, load_params=False).cfg.tokens_per_image
    for k, (line, problem) in enumerate(zip(lines, [p for p in problems for _ in range(G)], strict=True)):
        assert line["schema"] == "mllmjax.rollout/2"
        assert (line["group"], line["sample"]) == (k // G, k % G)
        assert line["prompt_id"] == problem.id and line["answer"] == problem.answer
        [image] = line["images"]
        path = out.parent / image["path"]
        assert image["path"] == f"r.jsonl.images/{Path(problem.images[0]).name}"
        assert image["sha256"] == sha(path) == sha(Path(problem.images[0]))  # the same picture, redrawn
        assert line["prompt_ids"].count(IMAGE_TOKEN) == per_image
        assert problem.question in line["prompt"]
        assert len(line["logprobs"]) == len(line["completion_ids"]) <= 8
    # a group shares its prompt and picture; sampled, its members differ
    for g in range(2):
        group = lines[g * G : (g + 1) * G]
        assert len({json.dumps([x["prompt_ids"], x["images"]]) for x in group}) == 1
        assert len({tuple(x["completion_ids"]) for x in group}) > 1
    assert sorted(p.name for p in (out.parent / "r.jsonl.images").iterdir()) == sorted(
        Path(p.images[0]).name for p in problems
    )


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_score_keeps_schema_2_and_refuses_a_changed_image(count_rollout, tmp_path):
    _, out = count_rollout
    before = records(out)
    # one completion answers right: the numeric-answer reward (correct) scores the picture's count
    before[0]["completion"] = f"<answer>{before[0]['answer']}</answer>"
    edited = out.parent / "edited.jsonl"
    edited.write_text("".join(json.dumps(x) + "\n" for x in before))
    scored = tmp_path / "sub" / "s.jsonl"
    result = run("score", edited, "--reward", "correct=1", "-o", scored)
    assert result.exit_code == 0, result.output
    after = records(scored)
    assert len(after) == len(before)
    assert after[0]["rewards"] == {"correct": 1.0}
    for b, a in zip(before, after, strict=True):
        assert a["schema"] == "mllmjax.rollout/2" and "advantage" in a
        # the same files, their paths now relative to the scored file's folder (or absolute)
        assert [x["sha256"] for x in a["images"]] == [x["sha256"] for x in b["images"]]
        assert [(scored.parent / x["path"]).resolve() for x in a["images"]] == [
            (out.parent / x["path"]).resolve() for x in b["images"]
        ]
    # text rollouts still read and write /1 (tests/test_score_cli.py); a changed picture is refused
    copy = tmp_path / "r.jsonl"
    copy.write_text(out.read_text())
    (tmp_path / "r.jsonl.images").mkdir()
    for line in before[:1]:
        for x in line["images"]:
            (tmp_path / x["path"]).write_bytes((out.parent / x["path"]).read_bytes())
    result = run("score", copy, "-o", tmp_path / "s2.jsonl")
    _expect_bad(result, "no such file")  # the second prompt's picture was not copied
    for line in before[G:]:
        for x in line["images"]:
            Image.new("RGB", (8, 8)).save(tmp_path / x["path"])
    result = run("score", copy, "-o", tmp_path / "s2.jsonl")
    _expect_bad(result, "has changed since it was sampled")
    assert not (tmp_path / "s2.jsonl").exists()


@pytest.mark.parametrize("converted", ["clip-llama", "siglip-qwen2", "siglip-gemma3"], indirect=True)
def test_greedy_rollout_with_record_images_matches_hf_generate(converted, tmp_path):  # noqa: F811
    """Data records with images (a list, a single path, none): greedy rollouts equal HF's greedy
    decoding of the same prompt ids and pixels, the prompt ids are what the processor makes of the
    record's prompt text and images, and the G samples of a prompt are the same completion."""
    model, root = converted
    (tmp_path / "pics").mkdir()
    write_image(tmp_path / "pics" / "a.png", 0)
    write_image(tmp_path / "pics" / "b.png", 1, (33, 17))
    rows = [
        {"question": "w1 w2", "answer": "4", "images": ["pics/a.png"]},
        {"question": "w3 w4 w5", "answer": "5", "images": "pics/b.png"},
        {"question": "w6", "answer": "6"},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    system = tmp_path / "system.txt"
    system.write_text("w7 w8 w9")
    out = tmp_path / "out" / "r.jsonl"
    result = run(
        "rollout", root / "ck", "--data", data, "--greedy", "-G", 2, "--max-new-tokens", NEW,
        "--system-prompt", system, "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = records(out)
    assert [x["schema"] for x in lines] == ["mllmjax.rollout/2"] * 4 + ["mllmjax.rollout/1"] * 2
    processor = transformers.AutoProcessor.from_pretrained(root / "ck")
    stops = stop_ids(root)
    for row, pair in zip(rows, [lines[0:2], lines[2:4], lines[4:6]], strict=True):
        first = pair[0]
        names = [row["images"]] if isinstance(row.get("images"), str) else row.get("images", [])
        paths = [tmp_path / n for n in names]
        if names:
            assert [x["path"] for x in first["images"]] == [str(p) for p in paths]  # outside out/: absolute
            assert [x["sha256"] for x in first["images"]] == [sha(p) for p in paths]
        inputs = processor(
            text=first["prompt"],
            images=[Image.open(p) for p in paths] or None,
            return_tensors="pt",
            add_special_tokens=False,
        )
        assert first["prompt_ids"] == inputs["input_ids"][0].tolist()
        assert first["prompt"].count("w7 w8 w9") == 1 and row["question"] in first["prompt"]
        ref_ids, ref_lps = hf_greedy(model, inputs)
        want = until_stop(ref_ids, stops)
        assert first["completion_ids"] == want, row
        assert np.abs(np.array(first["logprobs"]) - np.array(ref_lps[: len(want)])).max() <= TOL
        assert pair[1]["completion_ids"] == want and pair[1]["sample"] == 1


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_eval_on_a_visual_task_decodes_hfs_greedy_tokens_with_the_pictures(
    converted,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """`eval` on builtin:count: each problem's completion is HF's greedy decoding of the prompt ids
    and pixels its processor makes of the drawn picture; the numbers are those of its records; with
    -o the pictures stay beside them, without -o they are drawn into a temporary folder and removed."""
    model, root = converted
    out = tmp_path / "out" / "e.jsonl"
    args = ("eval", root / "ck", "--data", "builtin:count", "--num-prompts", 2, "--max-new-tokens", NEW, "--json")
    result = run(*args, "-o", out)
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    lines = records(out)
    assert numbers["problems"] == 2 and numbers["k"] == 1 and len(lines) == 2
    assert numbers["mean_tokens"] == np.mean([len(x["completion_ids"]) for x in lines])
    assert numbers["truncation_rate"] == np.mean([x["finish_reason"] == "length" for x in lines])
    processor = transformers.AutoProcessor.from_pretrained(root / "ck")
    stops = stop_ids(root)
    for line in lines:
        assert line["schema"] == "mllmjax.rollout/2"
        [image] = line["images"]
        assert image["path"].startswith("e.jsonl.images/") and sha(out.parent / image["path"]) == image["sha256"]
        pixels = Image.open(out.parent / image["path"])
        inputs = processor(text=line["prompt"], images=[pixels], return_tensors="pt", add_special_tokens=False)
        assert line["prompt_ids"] == inputs["input_ids"][0].tolist()
        ref_ids, ref_lps = hf_greedy(model, inputs)
        want = until_stop(ref_ids, stops)
        assert line["completion_ids"] == want
        assert np.abs(np.array(line["logprobs"]) - np.array(ref_lps[: len(want)])).max() <= TOL
    # without -o: the same numbers, and no picture left behind
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    again = run(*args)
    assert again.exit_code == 0, again.output
    numbers_again = json.loads(again.stdout.strip().splitlines()[-1])
    assert {k: v for k, v in numbers_again.items() if k != "seconds"} == {
        k: v for k, v in numbers.items() if k != "seconds"
    }
    assert list(scratch.iterdir()) == []


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    save_hf_model("llama-tied", root / "hf")
    assert run("convert", root / "hf", "-o", root / "ck", "--dtype", "float32").exit_code == 0
    return root / "ck"


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_bad_image_inputs_are_one_line_and_write_nothing(
    converted,  # noqa: F811
    count_rollout,
    text_ckpt,
    tmp_path,
):
    _, root = converted
    ck, out = root / "ck", tmp_path / "r.jsonl"
    write_image(tmp_path / "a.png", 0)
    write_image(tmp_path / "b.png", 1)
    (tmp_path / "broken.png").write_text("not an image")

    def data(*rows: dict) -> Path:
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"answer": "1", **r}) + "\n" for r in rows))
        return path

    def bad(*args: object, fragments: tuple[str, ...]) -> None:
        _expect_bad(run("rollout", *args, "--max-new-tokens", 4, "-G", 2, "-o", out), *fragments)
        assert not out.exists() and not Path(f"{out}.images").exists()

    d = data({"question": "w1", "images": ["a.png"]}, {"question": "w2", "images": ["missing.png"]})
    bad(ck, "--data", d, fragments=("d.jsonl:2", "missing.png", "no such file"))
    bad(ck, "--data", data({"question": "w1", "images": "broken.png"}), fragments=("not a readable image",))
    two = data({"question": "<image> w1", "images": ["a.png", "b.png"]})
    bad(ck, "--data", two, fragments=("1 image slot", "2 images"))
    # a text checkpoint takes no images
    bad(text_ckpt, "--data", "builtin:count", fragments=("is a text model", "vision-language"))
    bad(text_ckpt, "--data", data({"question": "w1", "images": ["a.png"]}), fragments=("is a text model",))
    # a failure after the pictures are drawn removes them: here the context is too short for the prompt
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["w1"] * 300))
    bad(ck, "--data", "builtin:count", "--num-prompts", 1, "--system-prompt", long, fragments=("context",))
    _expect_bad(run("rollout", ck, "--data", "builtin:count", "-o", "-"), "--image-dir")
    # a text checkpoint evaluates and trains on no visual task, and trains on no /2 records
    _expect_bad(run("eval", text_ckpt, "--data", "builtin:read", "-o", out), "is a text model", "vision-language")
    _expect_bad(run("eval", text_ckpt, "--data", data({"question": "w1", "images": ["a.png"]})), "is a text model")
    grpo = run("grpo", "--model", text_ckpt, "--data", "builtin:count", "--steps", 1, "-o", tmp_path / "run")
    _expect_bad(grpo, "visual task", "only a vision-language checkpoint")
    grpo = run("grpo", "--model", text_ckpt, "--data", data({"question": "w1", "images": ["a.png"]}), "--steps", 1,
               "-o", tmp_path / "run")  # fmt: skip
    _expect_bad(grpo, "is a text model", "d.jsonl:0 has images", "--image-field images")
    assert not (tmp_path / "run").exists()
    _, rollouts = count_rollout
    scored = tmp_path / "s.jsonl"
    assert run("score", rollouts, "-o", scored).exit_code == 0
    _expect_bad(run("train", text_ckpt, scored, "-o", tmp_path / "t"), "mllmjax.rollout/2", "is a text model")
    assert not out.exists() and not (tmp_path / "t").exists()


@pytest.mark.parametrize("converted", ["clip-llama"], indirect=True)
def test_records_holding_their_images_roll_out_as_the_same_pictures_by_path(converted, tmp_path):  # noqa: F811
    """A Parquet file written by `datasets` whose records hold their images (an Image feature):
    rollout writes each image's bytes into OUT.images/ and samples what the same pictures given by
    path sample (prompt ids, greedy completions, hashes); with -o - it needs --image-dir; a grpo step
    on it writes them into RUN/images/ and its records point at them."""
    import datasets

    _, root = converted
    write_image(tmp_path / "a.png", 0)
    write_image(tmp_path / "b.png", 1, (33, 17))
    by_path = [{"question": "w1 w2", "answer": "4", "images": ["a.png"]},
               {"question": "w3", "answer": "5", "images": ["b.png", "a.png"]}]  # fmt: skip
    (tmp_path / "paths.jsonl").write_text("".join(json.dumps(r) + "\n" for r in by_path))
    held = [
        {**r, "images": [{"bytes": (tmp_path / n).read_bytes(), "path": None} for n in r["images"]]}
        for r in by_path
    ]
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.Sequence(datasets.Image())})  # fmt: skip
    datasets.Dataset.from_list(held, features=features).to_parquet(str(tmp_path / "held.parquet"))
    common = ["rollout", root / "ck", "--greedy", "-G", 1, "--max-new-tokens", 6]
    for name in ("paths.jsonl", "held.parquet"):
        result = run(*common, "--data", tmp_path / name, "-o", tmp_path / "out" / f"{name}.r.jsonl")
        assert result.exit_code == 0, result.output
    one, two = (records(tmp_path / "out" / f"{n}.r.jsonl") for n in ("paths.jsonl", "held.parquet"))
    assert [r["prompt_ids"] for r in one] == [r["prompt_ids"] for r in two]
    assert [r["completion_ids"] for r in one] == [r["completion_ids"] for r in two]
    hashes = [[[x["sha256"] for x in r["images"]] for r in records] for records in (one, two)]
    assert hashes[0] == hashes[1]
    folder = tmp_path / "out" / "held.parquet.r.jsonl.images"
    for r in two:
        for x in r["images"]:
            path = tmp_path / "out" / x["path"]
            assert path.parent == folder and path.name == x["sha256"][:32] + ".png"
            assert sha(path) == x["sha256"]
    assert len(list(folder.iterdir())) == 2  # a.png, used twice, is one file
    result = run(*common, "--data", tmp_path / "held.parquet", "-o", "-")
    _expect_bad(result, "holds the images themselves", "--image-dir")

    out = tmp_path / "run"
    result = run("grpo", "--model", root / "ck", "--data", tmp_path / "held.parquet", "-G", 2, "--prompts-per-step", 2,
                 "--max-new-tokens", 4, "--reward", "correct=1.0", "--reward-fn", "grpo_rewards:even=1",
                 "--steps", 1, "--no-probe", "--eval-every", 0, "--save-rollouts", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    step = records(out / "rollouts" / "step_1.jsonl")
    used = {x["sha256"] for r in step for x in r["images"]}
    assert used == {sha(tmp_path / "a.png"), sha(tmp_path / "b.png")}
    for r in step:
        for x in r["images"]:
            path = (out / "rollouts" / x["path"]).resolve()
            assert path.parent == (out / "images").resolve() and sha(path) == x["sha256"]
