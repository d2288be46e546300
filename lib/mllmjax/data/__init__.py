"""Problems (question + gold answer) from every source behind one function, `load_problems`.

Specs (the `--data` value):

- `gsm8k`: short name for the hub dataset `openai/gsm8k`, config `main`.
- `owner/name[:config]`: any hub dataset, through `datasets.load_dataset` (its cache, or the network).
- a path to a `.jsonl`, `.json` or `.parquet` file, or a directory holding `{split}.jsonl` /
  `{split}.parquet` (so `../shared/data/gsm8k --split test` works).
- `builtin:TASK[:level=N,seed=S]`: a task generated offline from a seed (`mllmjax.data.builtin`);
  `DEFAULT_TASK` is the embedded default's. The visual tasks `builtin:count` and `builtin:read`
  (`mllmjax.data.visual`) draw a picture per problem into the `image_dir` the caller gives.
- Records of a file may carry images (`image_field`, "images" in `rollout`): a path or a list of paths,
  relative to the data file; each is read when the problems are loaded, so a missing or unreadable
  image is an error naming its record before any work.
- Or the images themselves: a `datasets` Image feature (a Parquet file that `datasets` wrote holds
  `{"bytes", "path"}` structs; a hub dataset's Image columns are read undecoded, as those). Their bytes
  are written unchanged into the `image_dir` the caller gives, each file named by its SHA-256
  (`IMAGE_DATA`), so a problem's images are paths like every other's and its records can carry their
  hashes.

Design decisions:

- The gold answer is extracted once, here, and kept in `Problem.answer`: GSM8K's text after the last
  `####`, stripped, with thousands separators inside numbers removed (`1,234` -> `1234`). A source whose
  answer field has no `####` is taken to hold the gold itself. The whole source record stays in `meta`.
- Field names default to GSM8K's (`question`, `answer`) and can be changed per call (`--question-field`,
  `--answer-field`); a record without them is an error that names the file, the line and the fields
  the record does have, never a silently skipped problem.
- Selection is `offset`/`num` over the split, after an optional shuffle that is a pure function of
  `seed` (`random.Random(seed)` over the indices), so a run's data order can be replayed on resume.
- A hub dataset that cannot be fetched (no network, no cache) is one `BadInputError` that says so and
  suggests a local file; `datasets`' own retries and messages stay behind it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mllmjax.data import builtin, visual
from mllmjax.errors import BadInputError, RecordError, decode_utf8

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_TASK",
    "Problem",
    "extract_gold",
    "load_problems",
    "resolve_spec",
]

DEFAULT_TASK = "builtin:arith:level=0"
"""The embedded default's task: the level at which SmolLM2-135M-Instruct gets some but not all answers
right at temperature 1, so groups' rewards vary and GRPO has signal from the first step
(scripts/measure_default_task.py; the figures are in docs/benchmarks.md)."""

DEFAULT_MAX_NEW_TOKENS = 160
"""Length budget for evaluating `DEFAULT_TASK`: most completions end well before it. The embedded grpo
recipe samples 128 instead (a step is shorter, and a cut completion, which scores 0, teaches brevity)."""

SHORT_NAMES = {"gsm8k": ("openai/gsm8k", "main")}
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?$")
# A comma between a digit and exactly three digits is a thousands separator (1,234 / 12,345,678);
# other commas (lists such as "3, 4") are text and stay.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    """One question with its extracted gold answer; `meta` holds the source record as read."""

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    images: tuple[str, ...] = ()  # image file paths (absolute), for vision-language prompts

    def __post_init__(self) -> None:
        if not isinstance(self.question, str) or not self.question.strip():
            raise BadInputError(
                f"problem {self.id!r}: question must be non-empty text, got {self.question!r}"
            )
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise BadInputError(
                f"problem {self.id!r}: gold answer must be non-empty text, got {self.answer!r}"
            )


def extract_gold(answer: Any) -> str:
    """The gold answer from a source's answer field: GSM8K's text after the last `####`, or the whole
    field when it has none; stripped, thousands separators removed. Numbers are turned into text."""
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise ValueError(f"answer must be text or a number, got {type(answer).__name__}")
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return _THOUSANDS.sub("", text.strip())


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Source:
    kind: str  # "hub" | "file" | "builtin"
    name: str  # hub id, file path or builtin spec
    config: str | None = None


def resolve_spec(spec: str, split: str = "train") -> _Source:
    """What a `--data` spec names; raises `BadInputError` listing the accepted forms when it names
    nothing."""
    if not isinstance(spec, str) or not spec.strip():
        raise BadInputError(f"--data must name a dataset, got {spec!r}")
    spec = spec.strip()
    if spec in SHORT_NAMES:
        hub_id, config = SHORT_NAMES[spec]
        return _Source(kind="hub", name=hub_id, config=config)
    if spec.startswith("builtin:"):
        return _Source(kind="builtin", name=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        for suffix in (".jsonl", ".parquet", ".json"):
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return _Source(kind="file", name=str(candidate))
        raise BadInputError(f"directory {spec!r} has no {split}.jsonl, {split}.parquet or {split}.json")
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise BadInputError(f"data file {spec!r} does not exist")
        return _Source(kind="file", name=str(path))
    if _HUB_ID.match(spec):
        hub_id, _, config = spec.partition(":")
        return _Source(kind="hub", name=hub_id, config=config or None)
    raise BadInputError(
        f"cannot tell what --data {spec!r} names; use gsm8k, a hub id owner/name[:config], "
        f"a .jsonl/.json/.parquet file or directory, or builtin:TASK (known: {', '.join(builtin.task_names())})"
    )


def load_problems(
    spec: str,
    *,
    split: str = "train",
    question_field: str | None = None,
    answer_field: str | None = None,
    num: int | None = None,
    offset: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    image_field: str | None = None,
    image_dir: str | Path | None = None,
    draw: bool = True,
) -> list[Problem]:
    """Problems `offset .. offset+num` of `split` of the dataset `spec` names (all of them when `num` is
    None), after a deterministic shuffle by `seed` when `shuffle` is set.

    `question_field`/`answer_field` name the record fields for hub and file sources (GSM8K's
    `question`/`answer` by default). A file is the split itself, so `split` only picks the file inside
    a directory, the hub split, or the built-in task's split.

    `image_field` names the record field of each problem's images (a path or a list of paths, relative
    to the data file, or images held in the record: a `datasets` Image feature); None reads no images.
    A visual built-in task writes its pictures, and a record's own images their files, into
    `image_dir` (required for those: only callers that sample with images pass it); with draw=False
    their paths are set but nothing is written (`visual.draw_missing` writes those of the problems a
    caller uses: a grpo run reads a few of a split's 20,000).
    """
    if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
        raise BadInputError(f"--num-prompts must be a positive integer, got {num!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise BadInputError(f"--offset must be a non-negative integer, got {offset!r}")
    if not isinstance(split, str) or not split:
        raise BadInputError(f"--split must be a split name, got {split!r}")
    source = resolve_spec(spec, split)
    if source.kind == "builtin":
        if question_field is not None or answer_field is not None:
            raise BadInputError("--question-field/--answer-field do not apply to built-in tasks")
        return _load_builtin(source.name, split, num, offset, shuffle, seed, image_dir, draw)

    qf, af = question_field or "question", answer_field or "answer"
    if source.kind == "hub":
        records, label = _read_hub(source, split), f"{source.name} ({split})"
        where = lambda i: f"{label} record {i}"  # noqa: E731
        id_prefix = f"{source.name}:{source.config + ':' if source.config else ''}{split}"
    else:
        records, where = _read_file(Path(source.name))
        id_prefix = Path(source.name).name
    base = Path(source.name).parent if source.kind == "file" else Path.cwd()
    order = _select(len(records), num, offset, shuffle, seed, label=source.name)
    problems = [_to_problem(records[i], i, qf, af, where, f"{id_prefix}:{i}") for i in order]
    if image_field is not None:
        folder = Path(image_dir).absolute() if image_dir is not None else None
        with_images = []
        for p, i in zip(problems, order, strict=True):
            paths, data = _record_images(records[i], i, image_field, where, base, folder)
            meta = {**p.meta, IMAGE_DATA: data} if data else p.meta
            with_images.append(dataclasses.replace(p, images=paths, meta=meta))
        problems = with_images
        if draw:
            visual.draw_missing(problems)
    return problems


# Problem.meta[IMAGE_DATA]: {path: bytes} of the images a record holds itself (a datasets Image feature),
# written to those paths by `visual.draw_missing` (at once unless load_problems(draw=False)).
IMAGE_DATA = "image_data"


def _record_images(
    record: dict[str, Any], index: int, field: str, where: Any, base: Path, folder: Path | None
) -> tuple[tuple[str, ...], dict[str, bytes]]:
    """(the absolute paths of a record's images, {path: bytes} of those it holds itself: written into
    `folder`, named by their SHA-256); none without the field. Each one is read now."""
    from mllmjax.images import open_image, open_image_bytes

    value = record.get(field)
    if value is None:
        return (), {}
    items = value if isinstance(value, list) else [value]
    paths: list[str] = []
    data: dict[str, bytes] = {}
    for item in items:
        raw = _image_bytes(item)
        if raw is None:
            path = item.get("path") if isinstance(item, dict) and item.get("bytes") is None else item
            if not isinstance(path, str) or not path:
                raise _record_error(
                    where(index), f"field {field!r} must be an image file path, a list of them, or image "
                    "data (a datasets Image feature) (--image-field)",
                )  # fmt: skip
            paths.append(str((base / path).absolute()))
            continue
        try:
            kind = open_image_bytes(raw)
        except BadInputError as e:
            raise _record_error(where(index), str(e)) from None
        if folder is None:
            raise _record_error(
                where(index), f"field {field!r} holds the images themselves, which are written to files "
                "for the records: give --image-dir",
            )  # fmt: skip
        path = str(folder / f"{hashlib.sha256(raw).hexdigest()[:32]}.{kind}")
        paths.append(path)
        data[path] = raw
    for path in paths:
        if path not in data:
            try:
                open_image(path)
            except BadInputError as e:
                raise _record_error(where(index), str(e)) from None
    return tuple(paths), data


def _image_bytes(item: Any) -> bytes | None:
    """The encoded bytes of an image a record holds itself: a datasets Image feature's {"bytes", "path"}
    (undecoded) or a decoded PIL image (its original bytes are gone: written as PNG, lossless); None
    for anything else."""
    if isinstance(item, dict) and isinstance(item.get("bytes"), bytes | bytearray):
        return bytes(item["bytes"])
    from PIL import Image

    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return buffer.getvalue()
    return None


def _select(size: int, num: int | None, offset: int, shuffle: bool, seed: int, *, label: str) -> list[int]:
    if size == 0:
        raise BadInputError(f"{label} holds no problems")
    if offset >= size:
        raise BadInputError(f"--offset {offset} is past the end of {label} ({size} problems)")
    indices = list(range(size))
    if shuffle:
        random.Random(seed).shuffle(indices)
    end = size if num is None else min(size, offset + num)
    return indices[offset:end]


def _to_problem(record: Any, index: int, qf: str, af: str, where: Any, pid: str) -> Problem:
    if not isinstance(record, dict):
        raise _record_error(where(index), f"expected a JSON object, got {type(record).__name__}")
    for field in (qf, af):
        if field not in record:
            have = ", ".join(sorted(map(str, record))) or "none"
            raise _record_error(
                where(index),
                f"no field {field!r} (fields: {have}); name it with --question-field/--answer-field",
            )
    question = record[qf]
    if not isinstance(question, str) or not question.strip():
        raise _record_error(where(index), f"field {qf!r} must be non-empty text, got {question!r}")
    try:
        gold = extract_gold(record[af])
    except ValueError as e:
        raise _record_error(where(index), f"field {af!r}: {e}") from None
    if not gold:
        raise _record_error(where(index), f"field {af!r} holds no gold answer: {record[af]!r}")
    return Problem(id=pid, question=question, answer=gold, meta=dict(record))


class _Where:
    """Names a record's position: `file:line` for JSON Lines, `file: record N` / `row N` otherwise."""

    def __init__(self, path: Path, lines: list[int] | None, unit: str):
        self.path, self.lines, self.unit = path, lines, unit

    def __call__(self, index: int) -> tuple[str, int] | str:
        if self.lines is not None:
            return (str(self.path), self.lines[index])
        return f"{self.path}: {self.unit} {index + 1}"


def _record_error(where: tuple[str, int] | str, message: str) -> BadInputError:
    if isinstance(where, tuple):
        return RecordError(where[0], where[1], message)
    return BadInputError(f"{where}: {message}")


def _read_file(path: Path) -> tuple[list[Any], _Where]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path), _Where(path, None, "row")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"data file {str(path)!r} does not exist") from None
    except OSError as e:
        raise BadInputError(f"cannot read data file {str(path)!r}: {e}") from None
    text = decode_utf8(data, str(path))
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(str(path), e.lineno, f"not valid JSON: {e.msg}") from None
        return records, _Where(path, None, "record")
    records: list[Any] = []
    lines: list[int] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise RecordError(str(path), lineno, f"not valid JSON: {e.msg} (column {e.colno})") from None
        lines.append(lineno)
    return records, _Where(path, lines, "line")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # comes with `datasets`; imported here so JSONL users never load it

    try:
        return pq.read_table(path).to_pylist()
    except FileNotFoundError:
        raise BadInputError(f"data file {str(path)!r} does not exist") from None
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise BadInputError(f"cannot read Parquet file {str(path)!r}: {e}") from None


def _read_hub(source: _Source, split: str) -> list[dict[str, Any]]:
    import datasets  # heavy; only hub specs need it

    label = source.name + (f" (config {source.config!r})" if source.config else "")
    endpoint = _hub_endpoint()
    online = _reachable(endpoint)
    try:
        # Unreachable: the local cache only, at once (the hub client would retry for half a minute).
        with contextlib.nullcontext() if online else _hub_offline():
            ds = datasets.load_dataset(source.name, source.config, split=split)
    except Exception as e:  # ConnectionError, DatasetNotFoundError, ValueError for a split, ...
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if online else f" ({endpoint} cannot be reached and it is not in the local cache)"
        raise BadInputError(
            f"could not fetch hub dataset {label}, split {split!r}{where}: {cause}; without network access, "
            f"pass a local .jsonl/.parquet file (or a directory with {split}.jsonl) to --data instead"
        ) from e
    return list(_undecoded_images(ds))


def _undecoded_images(ds: Any) -> Any:
    """The dataset with its Image columns (and lists of images) read undecoded, as {"bytes", "path"}:
    a record's images are written as the bytes the dataset holds (`_record_images`), not re-encoded."""
    import datasets

    for name, feature in (getattr(ds, "features", None) or {}).items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):  # List / Sequence of images
            ds = ds.cast_column(name, dataclasses.replace(feature, feature=datasets.Image(decode=False)))
    return ds


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` (False in offline mode)."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE for this call (the libraries read the variable once, at import)."""
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _load_builtin(
    spec: str,
    split: str,
    num: int | None,
    offset: int,
    shuffle: bool,
    seed: int,
    image_dir: str | Path | None = None,
    draw: bool = True,
) -> list[Problem]:
    parsed = builtin.parse_builtin_spec(spec)
    if split not in builtin.SPLIT_SIZES:
        raise BadInputError(f"built-in tasks have splits {', '.join(builtin.SPLIT_SIZES)}, got {split!r}")
    visual_task = parsed.task in visual.VISUAL_TASKS
    if visual_task and image_dir is None:
        raise BadInputError(
            f"builtin:{parsed.task} is a visual task (a picture per question): only a vision-language "
            "checkpoint reads it (rollout, eval and grpo on one, and train on its scored records)"
        )
    order = _select(builtin.SPLIT_SIZES[split], num, offset, shuffle, seed, label=f"{parsed.name} ({split})")
    if visual_task:
        return [_visual_problem(parsed, split, i, Path(image_dir), draw) for i in order]  # type: ignore[arg-type]
    problems = []
    for i in order:
        g = builtin.generate(parsed, split, i)
        meta = {
            "task": parsed.task,
            "level": parsed.level,
            "seed": parsed.seed,
            "split": split,
            "index": i,
            "expression": g.expression,
        }
        problems.append(
            Problem(id=f"{parsed.name}:{split}:{i}", question=g.question, answer=str(g.answer), meta=meta)
        )
    return problems


def _visual_problem(
    parsed: builtin.BuiltinSpec, split: str, index: int, image_dir: Path, draw: bool = True
) -> Problem:
    """Problem `index` of a visual built-in task, its picture written into image_dir (with draw=False
    only named there: `visual.draw_missing`)."""
    g = visual.generate(parsed, split, index)
    name = f"{parsed.task}-level{parsed.level}-seed{parsed.seed}-{split}-{index:05d}"
    if draw:
        path = visual.render_to(image_dir, name, parsed.task, g.scene)
    else:
        path = visual.picture_path(image_dir, name)
    meta = {
        "task": parsed.task,
        "level": parsed.level,
        "seed": parsed.seed,
        "split": split,
        "index": index,
        "expression": g.expression,
        "scene": g.scene,
    }
    return Problem(
        id=f"{parsed.name}:{split}:{index}",
        question=g.question,
        answer=str(g.answer),
        meta=meta,
        images=(str(path.absolute()),),
    )
