"""The built-in visual tasks (`builtin:count`, `builtin:read`): deterministic pictures, answers checked
from the pixels (connected blobs; each digit matched against the font's own glyphs), train and test
disjoint, and data files whose records carry images."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from mllmjax.data import load_problems, visual
from mllmjax.errors import BadInputError, RecordError

LEVELS = range(4)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def blobs(path) -> tuple[np.ndarray, int]:
    """The connected blobs of non-background pixels (8-connected), and how many there are."""
    mask = (pixels(path) != visual.BACKGROUND).any(-1)
    return ndimage.label(mask, structure=np.ones((3, 3)))


def glyph(digit: int) -> np.ndarray:
    """The ink mask of one digit in the font, cropped to its bounding box."""
    image = Image.new("L", (80, 80), 0)
    ImageDraw.Draw(image).text(
        (10, 10), str(digit), fill=255, font=ImageFont.load_default(size=visual.FONT_SIZE)
    )
    ink = np.asarray(image) > 0
    rows, cols = np.nonzero(ink)
    return ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def read_digits(path) -> list[int]:
    """The digits of a `read` picture, left to right, each blob matched to the glyph with its exact ink."""
    labels, n = blobs(path)
    glyphs = {d: glyph(d) for d in range(10)}
    found = []
    for k, box in enumerate(ndimage.find_objects(labels)):
        ink = labels[box] == k + 1
        matches = [d for d, g in glyphs.items() if g.shape == ink.shape and (g == ink).all()]
        assert len(matches) == 1, (path, k, matches)
        found.append((box[1].start, matches[0]))
    return [d for _, d in sorted(found)]


@pytest.mark.parametrize("level", LEVELS)
def test_count_answers_are_the_shapes_in_the_picture(level, tmp_path):
    problems = load_problems(f"builtin:count:level={level}", split="train", num=12, image_dir=tmp_path)
    lo, hi = {0: (1, 4), 1: (1, 6), 2: (2, 9), 3: (3, 12)}[level]
    for p in problems:
        [path] = p.images
        assert blobs(path)[1] == int(p.answer), p.id
        assert lo <= int(p.answer) <= hi
        assert p.question == "How many shapes are in the picture?"


@pytest.mark.parametrize("level", LEVELS)
def test_read_answers_are_the_sum_of_the_digits_in_the_picture(level, tmp_path):
    problems = load_problems(f"builtin:read:level={level}", split="test", num=8, image_dir=tmp_path)
    for p in problems:
        digits = read_digits(p.images[0])
        assert len(digits) == level + 2
        assert sum(digits) == int(p.answer), p.id
        assert " + ".join(map(str, digits)) == p.meta["expression"]


@pytest.mark.parametrize("task", sorted(visual.VISUAL_TASKS))
def test_visual_tasks_are_deterministic(task, tmp_path):
    first = load_problems(f"builtin:{task}:seed=3", num=5, offset=7, image_dir=tmp_path / "a")
    again = load_problems(f"builtin:{task}:seed=3", num=5, offset=7, image_dir=tmp_path / "b")
    # a slice is generated alone: the same problems as the longer run they belong to
    longer = load_problems(f"builtin:{task}:seed=3", num=12, image_dir=tmp_path / "c")
    for x, y, z in zip(first, again, longer[7:], strict=True):
        assert (x.id, x.question, x.answer, x.meta) == (y.id, y.question, y.answer, y.meta)
        assert (x.answer, x.meta) == (z.answer, z.meta)
        assert open(x.images[0], "rb").read() == open(y.images[0], "rb").read()
    other = load_problems(f"builtin:{task}:seed=4", num=5, offset=7, image_dir=tmp_path / "d")
    assert [p.meta["scene"] for p in other] != [p.meta["scene"] for p in first]


@pytest.mark.parametrize("task", sorted(visual.VISUAL_TASKS))
def test_train_and_test_pictures_are_disjoint(task, tmp_path):
    def digests(split: str) -> dict[str, str]:
        problems = load_problems(f"builtin:{task}:level=0", split=split, num=150, image_dir=tmp_path / split)
        return {hashlib.sha256(open(p.images[0], "rb").read()).hexdigest(): p.id for p in problems}

    train, test = digests("train"), digests("test")
    assert len(train) == 150 and len(test) == 150  # no repeated picture within a split either
    assert not set(train) & set(test)
    # by construction: each scene's split is the one its own description hashes to
    for split in ("train", "test"):
        for p in load_problems(f"builtin:{task}", split=split, num=20, image_dir=tmp_path / "x"):
            from mllmjax.data.builtin import split_of

            assert split_of(visual.scene_key(task, p.meta["scene"])) == split


@pytest.mark.parametrize("task", sorted(visual.VISUAL_TASKS))
def test_undrawn_pictures_are_drawn_when_used(task, tmp_path):
    """draw=False (a grpo run) names the pictures and writes nothing; draw_missing draws the problems it
    is given, the same files the eager load writes, and leaves pictures already there alone."""
    eager = load_problems(f"builtin:{task}", num=4, image_dir=tmp_path / "eager")
    lazy = load_problems(f"builtin:{task}", num=4, image_dir=tmp_path / "lazy", draw=False)
    assert not (tmp_path / "lazy").exists()
    assert [(p.id, p.question, p.answer, p.meta) for p in lazy] == [(p.id, p.question, p.answer, p.meta) for p in eager]
    visual.draw_missing(lazy[1:3])
    assert sorted(x.name for x in (tmp_path / "lazy").iterdir()) == sorted(
        os.path.basename(p.images[0]) for p in lazy[1:3]
    )
    for x, y in zip(eager[1:3], lazy[1:3], strict=True):
        assert open(x.images[0], "rb").read() == open(y.images[0], "rb").read()
    stamp = os.stat(lazy[1].images[0]).st_mtime_ns
    visual.draw_missing(lazy)
    assert os.stat(lazy[1].images[0]).st_mtime_ns == stamp and all(os.path.isfile(p.images[0]) for p in lazy)


def test_a_picture_stopped_while_drawn_is_not_left_half_written(tmp_path, monkeypatch):
    """A run stopped while a picture is written (here: its PNG encoder fails after the first bytes)
    leaves no file under the picture's name, which draw_missing would take for drawn on --resume, and
    no temporary file; the next draw_missing writes it whole."""
    [problem] = load_problems("builtin:count", num=1, image_dir=tmp_path, draw=False)
    save = Image.Image.save

    def stopped(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", stopped)
    with pytest.raises(KeyboardInterrupt):
        visual.draw_missing([problem])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Image.Image, "save", save)
    visual.draw_missing([problem])
    assert [x.name for x in tmp_path.iterdir()] == [os.path.basename(problem.images[0])]
    [eager] = load_problems("builtin:count", num=1, image_dir=tmp_path / "eager")
    assert open(problem.images[0], "rb").read() == open(eager.images[0], "rb").read()


def test_visual_tasks_need_an_image_dir():
    with pytest.raises(BadInputError, match="visual task.*only a vision-language checkpoint"):
        load_problems("builtin:count", num=2)


def test_records_with_images(tmp_path):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "pics" / "a.png")
    Image.new("RGB", (8, 8), (4, 5, 6)).save(tmp_path / "pics" / "b.png")
    rows = [
        {"question": "q1", "answer": "1", "images": ["pics/a.png", "pics/b.png"]},
        {"question": "q2", "answer": "2", "pic": "pics/b.png"},
        {"question": "q3", "answer": "3"},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = load_problems(str(data), image_field="images")
    assert p[0].images == (str(tmp_path / "pics/a.png"), str(tmp_path / "pics/b.png"))
    assert p[1].images == () and p[2].images == ()
    assert load_problems(str(data), image_field="pic")[1].images == (str(tmp_path / "pics/b.png"),)
    assert load_problems(str(data))[0].images == ()  # no image field: text only, as before

    rows[2]["images"] = ["pics/missing.png"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"d.jsonl:3.*missing.png: no such file"):
        load_problems(str(data), image_field="images")
    (tmp_path / "pics" / "bad.png").write_text("not a picture")
    rows[2]["images"] = "pics/bad.png"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"d.jsonl:3.*bad.png: not a readable image"):
        load_problems(str(data), image_field="images")
    rows[2]["images"] = [3]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match="must be an image file path, a list of them, or image data"):
        load_problems(str(data), image_field="images")


def _image_feature_parquet(path, rows) -> None:
    """rows as a Parquet file written by `datasets`, their "image" and "images" columns an Image
    feature and a list of Image features (stored as {"bytes", "path"} structs)."""
    import datasets

    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "image": datasets.Image(), "images": datasets.Sequence(datasets.Image())})  # fmt: skip
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


def test_records_holding_their_images_a_datasets_image_feature(tmp_path):
    """Images held in the records (a datasets Image feature, one or a list): written unchanged into
    image_dir, named by their SHA-256, at load or (draw=False, a grpo run) when draw_missing meets
    them; the problems carry those paths as for path records. Without image_dir, or with bytes that
    are not an image: one error naming the record."""
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    Image.new("RGB", (5, 9), (4, 5, 6)).save(tmp_path / "b.jpg", format="JPEG")
    raw = {n: (tmp_path / n).read_bytes() for n in ("a.png", "b.jpg")}
    held = {n: {"bytes": raw[n], "path": None} for n in raw}  # as a hub dataset's Parquet holds them
    rows = [
        {"question": "q1", "answer": "1", "image": held["a.png"], "images": [held["b.jpg"], held["a.png"]]},
        {"question": "q2", "answer": "2", "image": None, "images": []},
    ]
    data = tmp_path / "d.parquet"
    _image_feature_parquet(data, rows)
    folder = tmp_path / "imgs"
    [one] = load_problems(str(data), num=1, image_field="image", image_dir=folder)
    name = hashlib.sha256(raw["a.png"]).hexdigest()[:32] + ".png"
    assert one.images == (str(folder / name),) and (folder / name).read_bytes() == raw["a.png"]
    p = load_problems(str(data), image_field="images", image_dir=tmp_path / "lazy", draw=False)
    assert not (tmp_path / "lazy").exists() and p[1].images == ()
    assert [os.path.basename(x) for x in p[0].images] == [
        hashlib.sha256(raw["b.jpg"]).hexdigest()[:32] + ".jpeg", hashlib.sha256(raw["a.png"]).hexdigest()[:32] + ".png"
    ]  # fmt: skip
    visual.draw_missing(p)
    assert [open(x, "rb").read() for x in p[0].images] == [raw["b.jpg"], raw["a.png"]]
    # An Image feature that names its file instead (bytes null): a path relative to the data file.
    named = tmp_path / "named.jsonl"
    record = {"question": "q", "answer": "1", "image": {"bytes": None, "path": "b.jpg"}}
    named.write_text(json.dumps(record) + "\n")
    assert load_problems(str(named), image_field="image")[0].images == (str(tmp_path / "b.jpg"),)

    with pytest.raises(BadInputError, match=r"d.parquet: row 1: .* holds the images .*--image-dir"):
        load_problems(str(data), image_field="image")
    rows[1]["image"] = {"bytes": b"not a picture", "path": None}
    _image_feature_parquet(data, rows)
    with pytest.raises(BadInputError, match=r"d.parquet: row 2: an image of 13 bytes.*not a readable image"):
        load_problems(str(data), image_field="image", image_dir=folder)


def test_a_hub_datasets_image_columns_are_read_undecoded():
    """A hub dataset's Image columns (and lists of them) come as the {"bytes", "path"} the dataset
    holds, so the bytes written are the dataset's own, not a re-encoding of the decoded picture."""
    import io

    import datasets

    from mllmjax.data import _undecoded_images

    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (9, 8, 7)).save(buffer, format="JPEG")
    features = datasets.Features({"q": datasets.Value("string"), "image": datasets.Image(),
                                  "images": datasets.Sequence(datasets.Image())})  # fmt: skip
    item = {"bytes": buffer.getvalue(), "path": None}
    ds = datasets.Dataset.from_list([{"q": "x", "image": item, "images": [item, item]}], features=features)
    assert isinstance(ds[0]["image"], Image.Image)  # what datasets gives by default
    [row] = list(_undecoded_images(ds))
    assert row["q"] == "x" and row["image"]["bytes"] == buffer.getvalue()
    assert [x["bytes"] for x in row["images"]] == [buffer.getvalue()] * 2
