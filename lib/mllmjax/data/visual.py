"""Built-in offline visual tasks: pictures drawn with Pillow from a seed, with exact integer answers.

- `count`: N simple shapes (circles, squares, triangles) on a white background; "How many shapes are
  in the picture?"; the answer is N. Level 0 draws 1-4 shapes, 1 up to 6, 2 two to 9, 3 three to 12.
- `read`: a row of digits in the font Pillow ships (`ImageFont.load_default`); "What is the sum of the
  digits in the picture?". Level L draws L + 2 digits.

Design decisions:

- Problem `i` of a split is a pure function of (task, level, dataset seed, split, i), seeded like the
  text tasks (`builtin.generate`): its own `random.Random` from a SHA-256 of those.
- Train and test never share a picture: every scene (its full description: each shape's kind, place,
  size and colour, or each digit and where it is drawn) goes to a split by a SHA-256 of that
  description (`builtin.split_of`), and generation redraws until it lands in its own split. The
  questions alone cannot split them: they are the same for every picture.
- Shapes sit in distinct cells of a 4 x 4 grid with a margin, and digits in distinct columns, so no two
  of them touch: each is one connected blob of non-background pixels, which tests count independently
  of the generator.
- The scene is kept in the problem's meta (`scene`, `expression`), and the picture is written as a PNG
  into the directory the caller gives (`render_to`); problems reference it by path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mllmjax.data import builtin
from mllmjax.errors import BadInputError

SIZE = 224  # the canvas, square, in pixels: the processor resizes it to what the tower takes
BACKGROUND = (255, 255, 255)
GRID = 4
_COLOURS = (
    (220, 40, 40), (40, 150, 60), (40, 80, 210), (230, 150, 20),
    (140, 50, 170), (20, 160, 170), (90, 90, 90), (200, 60, 140),
)  # fmt: skip
_KINDS = ("circle", "square", "triangle")
_COUNTS = {0: (1, 4), 1: (1, 6), 2: (2, 9), 3: (3, 12)}
FONT_SIZE = 36
_DIGIT_STEP = 40  # column width of one digit: wider than any digit of the font at FONT_SIZE


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisualGenerated:
    """One generated visual problem: the question, its integer answer, the expression that gives it and
    the scene the picture is drawn from (JSON-able)."""

    question: str
    answer: int
    expression: str
    scene: dict[str, Any]


def count(r: random.Random, level: int) -> VisualGenerated:
    """N shapes in distinct grid cells; the answer is N."""
    lo, hi = _COUNTS[level]
    n = r.randint(lo, hi)
    cell = SIZE // GRID
    shapes = []
    for c in sorted(r.sample(range(GRID * GRID), n)):
        half = r.randint(8, 18)
        margin = half + 3
        x = (c % GRID) * cell + r.randint(margin, cell - margin)
        y = (c // GRID) * cell + r.randint(margin, cell - margin)
        shapes.append(
            {"kind": r.choice(_KINDS), "x": x, "y": y, "half": half, "colour": list(r.choice(_COLOURS))}
        )
    question = "How many shapes are in the picture?"
    return VisualGenerated(
        question=question, answer=n, expression=" + ".join(["1"] * n), scene={"shapes": shapes}
    )


def read(r: random.Random, level: int) -> VisualGenerated:
    """level + 2 digits in a row; the answer is their sum."""
    n = level + 2
    digits = [r.randint(0, 9) for _ in range(n)]
    x0 = r.randint(4, SIZE - n * _DIGIT_STEP - 4)
    places = [
        {"digit": d, "x": x0 + k * _DIGIT_STEP + r.randint(0, 6), "y": r.randint(50, 130)}
        for k, d in enumerate(digits)
    ]
    colour = list(r.choice(_COLOURS))
    question = "What is the sum of the digits in the picture?"
    return VisualGenerated(
        question=question,
        answer=sum(digits),
        expression=" + ".join(map(str, digits)),
        scene={"digits": places, "colour": colour},
    )


VISUAL_TASKS: dict[str, Callable[[random.Random, int], VisualGenerated]] = {"count": count, "read": read}
"""Task name -> generator(rng, level). Register more by adding to this dict."""
builtin.VISUAL_TASK_NAMES.update(VISUAL_TASKS)


def scene_key(task: str, scene: dict[str, Any]) -> str:
    """The canonical text of a scene, which assigns it to a split."""
    return task + "|" + json.dumps(scene, sort_keys=True, separators=(",", ":"))


def generate(spec: builtin.BuiltinSpec, split: str, index: int) -> VisualGenerated:
    """Problem `index` of `split` for a visual `spec`; the same inputs always give the same problem."""
    if split not in builtin.SPLIT_SIZES:
        raise BadInputError(f"built-in tasks have splits {', '.join(builtin.SPLIT_SIZES)}, got {split!r}")
    key = f"{spec.task}|{spec.level}|{spec.seed}|{split}|{index}".encode()
    r = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
    gen = VISUAL_TASKS[spec.task]
    for _ in range(10_000):
        g = gen(r, spec.level)
        if builtin.split_of(scene_key(spec.task, g.scene)) == split:
            return g
    raise BadInputError(f"built-in task {spec.task!r} could not draw a {split} picture (index {index})")


def draw(task: str, scene: dict[str, Any]) -> Any:
    """The PIL image of a scene."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    if task == "count":
        for s in scene["shapes"]:
            x, y, h, colour = s["x"], s["y"], s["half"], tuple(s["colour"])
            if s["kind"] == "circle":
                pen.ellipse((x - h, y - h, x + h, y + h), fill=colour)
            elif s["kind"] == "square":
                pen.rectangle((x - h, y - h, x + h, y + h), fill=colour)
            else:
                pen.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=colour)
    else:
        font = ImageFont.load_default(size=FONT_SIZE)
        for place in scene["digits"]:
            pen.text((place["x"], place["y"]), str(place["digit"]), fill=tuple(scene["colour"]), font=font)
    return image


def picture_path(folder: Path, name: str) -> Path:
    """Where `render_to` writes the picture `name` in folder."""
    return folder / f"{name}.png"


def render_to(folder: Path, name: str, task: str, scene: dict[str, Any]) -> Path:
    """Write the scene's picture as folder/name.png (PNG, no metadata) and return its path."""
    path = picture_path(folder, name)
    _write_whole(path, lambda tmp: draw(task, scene).save(tmp, format="PNG"))
    return path


def _write_whole(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` a file beside `path`, then rename it to `path`: the file appears whole or not at
    all, so a run stopped while writing leaves no truncated picture that `draw_missing` would take for
    a written one on --resume (and several processes may write the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def draw_missing(problems: Sequence[Any]) -> None:
    """Write each picture of `problems` whose file is not there yet (`load_problems(..., draw=False)`):
    a visual built-in problem's, drawn from its scene, and the images a data record held itself
    (`data.IMAGE_DATA`), their bytes unchanged; other problems are left alone. Either is a pure
    function of the problem, so one written again (a resumed run) is the same file."""
    from mllmjax.data import IMAGE_DATA

    for p in problems:
        for name, data in p.meta.get(IMAGE_DATA, {}).items():
            if not Path(name).is_file():
                _write_whole(Path(name), lambda tmp, data=data: tmp.write_bytes(data))
        if p.meta.get("task") in VISUAL_TASKS and "scene" in p.meta:
            for image in p.images:
                path = Path(image)
                if not path.is_file():
                    render_to(path.parent, path.stem, p.meta["task"], p.meta["scene"])
