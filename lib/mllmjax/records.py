"""Rollout records: the `mllmjax.rollout/1` JSON Lines schema that rollout, score, train and
`sample --json` exchange, and `mllmjax.rollout/2`, the same with the prompt's images.

One line per completion:

    {"schema": "mllmjax.rollout/1", "prompt_id", "group", "sample", "prompt", "prompt_ids",
     "completion", "completion_ids", "logprobs", "finish_reason": "stop"|"length",
     "answer", "policy", "meta": {...}}

and `score` adds "rewards" {name: value}, "reward" (weighted sum), "advantage", "reward_errors"
{name: "ExceptionType: message"}. A record whose prompt holds images (a vision-language rollout) is
`mllmjax.rollout/2`: the same fields plus "images": [{"path", "sha256"}, ...], one per image in prompt
order, each path relative to the records file's directory (absolute when the image is outside it or
the records go to stdout), and the SHA-256 of the file's bytes when it was sampled.

Design decisions:
- A frozen, keyword-only dataclass validated in `__post_init__`, so a record built in process (rollout,
  the grpo loop) is checked exactly like one read from disk. Reading turns the validation error into a
  `RecordError` naming the file and line.
- Field types: `prompt_id` is a string or an int (a dataset row index or a stable hash, the producer's
  choice); `group` (>= 0) identifies the prompt's group within a file and `sample` (0..G-1) the member;
  `logprobs` has one entry per completion id; `policy` is a free-form checkpoint id or step.
- The four score fields are all present or all absent: a half-scored record is a bug, not a state.
- Writes are atomic (a temp file in the destination directory, then `os.replace`), and an existing file
  is never replaced without `force`. `-` means stdin / stdout so stages pipe.
- A record is /2 exactly when it carries images, so text-only records stay /1, byte for byte. In
  memory an image's path is absolute (`read_records` resolves it against the file's directory, stdin's
  against the working directory); `write_records` makes it relative to where it writes.
- `group_records` is the one place that checks groups are complete (every group has samples 0..G-1
  exactly once, the same G everywhere, and one prompt), so estimators can assume a dense [groups, G]
  array and never mix groups.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from mllmjax.errors import ArtifactError, BadInputError, OutputExistsError, RecordError, utf8_lines

# meta key of a record that continues a partial completion (grpo's replay buffer): {"prefix": its text,
# "from_step": the step that sampled it}; rewards judge prefix + completion (`scoring.scored_text`).
CONTINUATION_KEY = "replay"

SCHEMA = "mllmjax.rollout/1"
SCHEMA_IMAGES = "mllmjax.rollout/2"  # /1 plus "images"
SCHEMAS = (SCHEMA, SCHEMA_IMAGES)
FINISH_REASONS = ("stop", "length")
STDIO = "-"

_BASE_FIELDS = (
    "prompt_id",
    "group",
    "sample",
    "prompt",
    "prompt_ids",
    "completion",
    "completion_ids",
    "logprobs",
    "finish_reason",
    "answer",
    "policy",
    "meta",
)
_SCORE_FIELDS = ("rewards", "reward", "advantage", "reward_errors")


class RecordValueError(ValueError):
    """A field has the wrong type or value; `read_records` adds the file and line."""


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass and never a valid id or index


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _require(ok: bool, field: str, expected: str, value: Any) -> None:
    if not ok:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise RecordValueError(f"field {field!r} must be {expected}, got {shown}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutRecord:
    """One completion of one prompt, optionally scored.

    Build one in process with keyword arguments (rollout, the grpo loop, `sample --json`), then
    `to_dict()` / `write_records`. Score fields are None until `score` fills them (`with_scores`).
    """

    prompt_id: str | int
    group: int
    sample: int
    prompt: str
    prompt_ids: list[int]
    completion: str
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    answer: str
    policy: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    rewards: dict[str, float] | None = None
    reward: float | None = None
    advantage: float | None = None
    reward_errors: dict[str, str] | None = None
    images: list[dict[str, str]] | None = None  # [{"path", "sha256"}] (schema /2); None: no images

    def __post_init__(self) -> None:
        _require(
            (isinstance(self.prompt_id, str) or _is_int(self.prompt_id)),
            "prompt_id",
            "a string or an integer",
            self.prompt_id,
        )
        _require(_is_int(self.group) and self.group >= 0, "group", "an integer >= 0", self.group)
        _require(_is_int(self.sample) and self.sample >= 0, "sample", "an integer >= 0", self.sample)
        for name in ("prompt", "completion", "answer", "policy"):
            value = getattr(self, name)
            _require(isinstance(value, str), name, "a string", value)
        for name in ("prompt_ids", "completion_ids"):
            value = getattr(self, name)
            _require(
                isinstance(value, list) and all(type(x) is int and x >= 0 for x in value),
                name,
                "a list of token ids (integers >= 0)",
                value,
            )
        _require(
            isinstance(self.logprobs, list)
            and all(_is_number(x) and math.isfinite(x) for x in self.logprobs),
            "logprobs",
            "a list of finite numbers",
            self.logprobs,
        )
        if len(self.logprobs) != len(self.completion_ids):
            raise RecordValueError(
                f"field 'logprobs' must have one entry per completion id: {len(self.logprobs)} log-probs "
                f"for {len(self.completion_ids)} completion ids"
            )
        _require(
            self.finish_reason in FINISH_REASONS,
            "finish_reason",
            " or ".join(repr(r) for r in FINISH_REASONS),
            self.finish_reason,
        )
        _require(isinstance(self.meta, dict), "meta", "an object", self.meta)
        if self.images is not None:
            _require(
                isinstance(self.images, list)
                and len(self.images) > 0
                and all(
                    isinstance(x, dict)
                    and set(x) == {"path", "sha256"}
                    and isinstance(x["path"], str)
                    and x["path"]
                    and isinstance(x["sha256"], str)
                    and len(x["sha256"]) == 64
                    for x in self.images
                ),
                "images",
                'a non-empty list of {"path": ..., "sha256": ...} (a 64-digit hex SHA-256)',
                self.images,
            )
        present = [getattr(self, name) is not None for name in _SCORE_FIELDS]
        if any(present) and not all(present):
            missing = [n for n, p in zip(_SCORE_FIELDS, present, strict=True) if not p]
            raise RecordValueError(
                f"a scored record needs all of {', '.join(_SCORE_FIELDS)}; missing {', '.join(missing)}"
            )
        if self.rewards is not None:
            _require(
                isinstance(self.rewards, dict)
                and all(
                    isinstance(k, str) and _is_number(v) and math.isfinite(v) for k, v in self.rewards.items()
                ),
                "rewards",
                "an object of name -> finite number",
                self.rewards,
            )
            _require(
                _is_number(self.reward) and math.isfinite(self.reward),
                "reward",
                "a finite number",
                self.reward,
            )
            _require(
                _is_number(self.advantage) and math.isfinite(self.advantage),
                "advantage",
                "a finite number",
                self.advantage,
            )
            _require(
                isinstance(self.reward_errors, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in self.reward_errors.items()),
                "reward_errors",
                "an object of name -> message",
                self.reward_errors,
            )

    @property
    def scored(self) -> bool:
        return self.rewards is not None

    @property
    def schema(self) -> str:
        return SCHEMA if self.images is None else SCHEMA_IMAGES

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of one line: schema first, images after the base fields (/2 only), score
        fields only when scored."""
        out: dict[str, Any] = {"schema": self.schema}
        for name in _BASE_FIELDS:
            out[name] = getattr(self, name)
        if self.images is not None:
            out["images"] = [dict(x) for x in self.images]
        if self.scored:
            for name in _SCORE_FIELDS:
                out[name] = getattr(self, name)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"), allow_nan=False)

    def with_scores(
        self, *, rewards: dict[str, float], reward: float, advantage: float, reward_errors: dict[str, str]
    ) -> RolloutRecord:
        return dataclasses.replace(
            self, rewards=rewards, reward=reward, advantage=advantage, reward_errors=reward_errors
        )

    @classmethod
    def from_dict(cls, obj: Any) -> RolloutRecord:
        """Validate one decoded JSON line. Raises RecordValueError saying what was expected."""
        if not isinstance(obj, dict):
            raise RecordValueError(f"expected a JSON object, got {type(obj).__name__}")
        schema = obj.get("schema")
        if schema not in SCHEMAS:
            raise RecordValueError(f"expected schema {SCHEMA!r} or {SCHEMA_IMAGES!r}, got {schema!r}")
        base = (*_BASE_FIELDS, "images") if schema == SCHEMA_IMAGES else _BASE_FIELDS
        missing = [name for name in base if name not in obj]
        if missing:
            raise RecordValueError(f"missing field(s) {', '.join(missing)} (schema {schema})")
        known = {"schema", *base, *_SCORE_FIELDS}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise RecordValueError(
                f"unknown field(s) {', '.join(unknown)} (schema {schema}; put extra data in 'meta')"
            )
        return cls(**{k: v for k, v in obj.items() if k != "schema"})


def _display_name(path: str | os.PathLike[str]) -> str:
    return "<stdin>" if str(path) == STDIO else str(path)


def parse_records(lines: Iterable[str], source: str, base: Path | None = None) -> list[RolloutRecord]:
    """Parse JSON Lines text; blank lines are skipped, line numbers are 1-based in the message. Relative
    image paths (/2) are resolved against `base` (the working directory by default)."""
    records: list[RolloutRecord] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(source, number, f"not valid JSON ({e.msg} at column {e.colno})") from None
        try:
            record = RolloutRecord.from_dict(obj)
        except RecordValueError as e:
            raise RecordError(source, number, str(e)) from None
        except TypeError as e:  # an unexpected keyword that slipped past from_dict's checks
            raise RecordError(source, number, str(e)) from None
        if record.images is not None:
            where = base if base is not None else Path.cwd()
            images = [{**x, "path": str((where / x["path"]).absolute())} for x in record.images]
            record = dataclasses.replace(record, images=images)
        records.append(record)
    return records


def read_records(path: str | os.PathLike[str]) -> list[RolloutRecord]:
    """Read rollout records from a JSON Lines file, or from stdin when `path` is `-`."""
    source = _display_name(path)
    if str(path) == STDIO:
        binary = getattr(sys.stdin, "buffer", None)
        return parse_records(sys.stdin if binary is None else utf8_lines(binary, source), source)
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "no such file"
        raise BadInputError(f"{source}: {what} (expected rollout records, JSON Lines)")
    with p.open("rb") as f:
        return parse_records(utf8_lines(f, source), source, base=p.parent)


def records_to_jsonl(records: Iterable[RolloutRecord], base: Path | None = None) -> str:
    """JSON Lines of records; image paths under `base` (the directory written to) are made relative to
    it, the others absolute."""
    return "".join(_relative_images(r, base).to_json() + "\n" for r in records)


def _relative_images(record: RolloutRecord, base: Path | None) -> RolloutRecord:
    if record.images is None:
        return record
    images = []
    for x in record.images:
        path = Path(x["path"]).absolute()
        if base is not None and path.is_relative_to(base.absolute()):
            path = path.relative_to(base.absolute())
        images.append({**x, "path": path.as_posix()})
    return dataclasses.replace(record, images=images)


def verify_images(records: Sequence[RolloutRecord], *, source: str = "records") -> None:
    """BadInputError unless every image of every record is still the file it was sampled from (its
    SHA-256 matches); each file is hashed once."""
    import hashlib

    seen: dict[str, str] = {}
    for position, record in enumerate(records):
        for x in record.images or ():
            path = x["path"]
            if path not in seen:
                p = Path(path)
                if not p.is_file():
                    raise BadInputError(
                        f"{source}: record {position + 1}: image {path}: "
                        f"{'is a directory' if p.is_dir() else 'no such file'}"
                    )
                seen[path] = hashlib.sha256(p.read_bytes()).hexdigest()
            if seen[path] != x["sha256"]:
                raise BadInputError(
                    f"{source}: record {position + 1}: image {path} has changed since it was sampled "
                    f"(sha256 {seen[path][:12]}..., the record says {x['sha256'][:12]}...)"
                )


def write_records(
    records: Iterable[RolloutRecord], path: str | os.PathLike[str], *, force: bool = False
) -> None:
    """Write records as JSON Lines to `path` atomically, or to stdout when `path` is `-`; in a
    multi-host run process 0 writes them.

    The text is built in full before anything touches the destination, so a bad record leaves no file;
    an existing file is replaced only with `force` (OutputExistsError otherwise).
    """
    records = list(records)
    text = records_to_jsonl(records, None if str(path) == STDIO else Path(path).parent)
    if "jax" in sys.modules:  # (scoring workers never import jax: they are single-process)
        from mllmjax.distributed import is_primary

        if not is_primary():  # a multi-host run: every process holds the same records
            return
    if str(path) == STDIO:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    p = Path(path)
    if p.is_dir():
        raise OutputExistsError(f"{p} is a directory; give a file name for the records")
    if p.exists() and not force:
        raise OutputExistsError(f"{p} exists; pass --force to replace it")
    write_text_atomic(p, text)


def write_text_atomic(p: Path, text: str) -> None:
    """Write `text` to a registered temp file beside `p` (mode from the umask), fsync, rename onto `p`.
    Missing parent directories are created (and removed again if the write fails)."""
    from mllmjax.cleanup import parents_of, temp_file
    from mllmjax.faults import signal_point

    parent = p.parent if str(p.parent) else Path(".")
    with (
        parents_of(p),
        temp_file(parent, p.name) as (fd, tmp),
        os.fdopen(fd, "w", encoding="utf-8") as f,
    ):
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
        signal_point("write")
        os.replace(tmp, p)


def refuse_images(
    records: Sequence[RolloutRecord], *, source: str = "records", model: str | os.PathLike[str] = "the model"
) -> None:
    """BadInputError for records with images (schema /2) given to a text model (`train` on a text
    checkpoint): it cannot read them."""
    for position, record in enumerate(records):
        if record.images is not None:
            raise BadInputError(
                f"{source}: record {position + 1} holds images (schema {SCHEMA_IMAGES}), but {model} is a "
                f"text model: train it on text rollouts ({SCHEMA}), or train a vision-language checkpoint "
                "on these"
            )


def require_scored(records: Sequence[RolloutRecord], *, source: str = "records") -> None:
    """Raise ArtifactError unless every record carries score fields (what `train` consumes)."""
    for position, record in enumerate(records):
        if not record.scored:
            raise ArtifactError(
                f"{source}: record {position + 1} (group {record.group}, sample {record.sample}) has no rewards "
                "or advantage; run 'mllmjax score' on the rollouts first"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Groups:
    """Records arranged as complete groups: `index[g][s]` is the position (in the input sequence) of
    sample s of the g-th group, groups in order of first appearance."""

    group_ids: list[int]
    index: list[list[int]]
    group_size: int

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)


def group_records(
    records: Sequence[RolloutRecord], *, group_size: int | None = None, source: str = "records"
) -> Groups:
    """Check that records form complete groups and return their layout.

    Every group must hold samples 0..G-1 exactly once, with one prompt_id, prompt and answer; G is the
    same for every group (`group_size` if given, else the largest sample index + 1 seen). Raises
    ArtifactError naming the group otherwise.
    """
    if not records:
        raise ArtifactError(f"{source}: no records")
    if group_size is not None and (not _is_int(group_size) or group_size < 1):
        raise BadInputError(f"group size must be an integer >= 1, got {group_size!r}")
    members: dict[int, dict[int, int]] = {}
    for position, record in enumerate(records):
        samples = members.setdefault(record.group, {})
        if record.sample in samples:
            raise ArtifactError(
                f"{source}: group {record.group} has sample {record.sample} twice "
                f"(records {samples[record.sample] + 1} and {position + 1})"
            )
        samples[record.sample] = position
    largest = max(max(samples) for samples in members.values()) + 1
    size = group_size if group_size is not None else largest
    if largest > size:
        raise ArtifactError(f"{source}: sample index {largest - 1} does not fit group size {size}")
    group_ids = list(members)
    index: list[list[int]] = []
    for gid in group_ids:
        samples = members[gid]
        if len(samples) != size:
            missing = [s for s in range(size) if s not in samples]
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise ArtifactError(
                f"{source}: group {gid} is incomplete: {len(samples)} of {size} samples, missing sample(s) "
                f"{shown}"
            )
        row = [samples[s] for s in range(size)]
        first = records[row[0]]
        for pos in row[1:]:
            other = records[pos]
            for name in ("prompt_id", "prompt", "answer"):
                if getattr(other, name) != getattr(first, name):
                    raise ArtifactError(
                        f"{source}: group {gid} mixes prompts: sample {other.sample} has a different "
                        f"{name} from sample {first.sample}"
                    )
        index.append(row)
    return Groups(group_ids=group_ids, index=index, group_size=size)
