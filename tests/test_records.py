"""The rollout record schema: validation, JSON Lines I/O (files and stdio), atomic writes, group checks."""

from __future__ import annotations

import io
import json
import sys

import pytest

from mllmjax.errors import ArtifactError, OutputExistsError, RecordError
from mllmjax.records import (
    SCHEMA,
    RolloutRecord,
    group_records,
    read_records,
    require_scored,
    write_records,
)


def make(group: int = 0, sample: int = 0, **overrides) -> RolloutRecord:
    fields = dict(
        prompt_id=f"p{group}",
        group=group,
        sample=sample,
        prompt="What is 2+2?",
        prompt_ids=[1, 2, 3],
        completion="<think>2+2</think>\n<answer>4</answer>",
        completion_ids=[7, 8],
        logprobs=[-0.5, -0.25],
        finish_reason="stop",
        answer="4",
        policy="ckpt@0",
        meta={"seed": 1},
    )
    fields.update(overrides)
    return RolloutRecord(**fields)


def line(**overrides) -> str:
    obj = make().to_dict()
    obj.update(overrides)
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


def test_round_trip_unscored_and_scored(tmp_path):
    scored = make(sample=1).with_scores(rewards={"correct": 1.0}, reward=1.0, advantage=0.5, reward_errors={})
    path = tmp_path / "r.jsonl"
    write_records([make(), scored], path)
    back = read_records(path)
    assert back == [make(), scored]
    first = json.loads(path.read_text().splitlines()[0])
    assert first["schema"] == SCHEMA and "reward" not in first
    assert json.loads(path.read_text().splitlines()[1])["advantage"] == 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"schema": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (
            line(schema="mllmjax.rollout/0"),
            "expected schema 'mllmjax.rollout/1' or 'mllmjax.rollout/2', got 'mllmjax.rollout/0'",
        ),
        (line(completion_ids=...), "missing field(s) completion_ids"),
        (line(group="3"), "field 'group' must be an integer >= 0, got '3'"),
        (line(sample=True), "field 'sample' must be an integer >= 0, got True"),
        (line(finish_reason="eos"), "field 'finish_reason' must be 'stop' or 'length'"),
        (line(logprobs=[-0.5]), "one entry per completion id"),
        (line(prompt_ids=[1, -2]), "field 'prompt_ids' must be a list of token ids"),
        (line(extra=1), "unknown field(s) extra"),
        (line(reward=1.0), "a scored record needs all of"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, text, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(line() + "\n\n" + text + "\n")
    with pytest.raises(RecordError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:3: ")
    assert expected in str(e.value)
    assert e.value.line == 3


def test_read_from_stdin_and_write_to_stdout(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(line() + "\n" + line(sample=1) + "\n"))
    records = read_records("-")
    assert [r.sample for r in records] == [0, 1]
    write_records(records, "-")
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["sample"] for x in out] == [0, 1]


def test_stdin_errors_say_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("nope\n"))
    with pytest.raises(RecordError, match=r"^<stdin>:1: not valid JSON"):
        read_records("-")


def test_write_refuses_to_overwrite_without_force_and_is_atomic(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("precious\n")
    with pytest.raises(OutputExistsError, match="--force"):
        write_records([make()], path)
    assert path.read_text() == "precious\n"
    # a record that fails to serialise leaves the old file and no temp file behind
    with pytest.raises(AttributeError):
        write_records([make(), object()], path, force=True)  # type: ignore[list-item]
    assert path.read_text() == "precious\n"
    write_records([make()], path, force=True)
    assert read_records(path) == [make()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_construction_validates_in_process():
    with pytest.raises(ValueError, match="'logprobs' must be a list of finite numbers"):
        make(logprobs=["x", 1])
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="'logprobs' must be a list of finite numbers"):
            make(logprobs=[bad] * len(make().completion_ids))


def test_group_records_complete_groups_any_order():
    records = [make(1, 1), make(0, 0), make(1, 0), make(0, 1)]
    groups = group_records(records)
    assert groups.group_size == 2
    assert groups.group_ids == [1, 0]
    assert groups.index == [[2, 0], [1, 3]]


def test_group_records_missing_member_names_the_group():
    records = [make(0, 0), make(0, 1), make(0, 2), make(5, 0), make(5, 2)]
    with pytest.raises(
        ArtifactError, match=r"r\.jsonl: group 5 is incomplete: 2 of 3 samples, missing sample\(s\) 1"
    ):
        group_records(records, source="r.jsonl")


def test_group_records_expected_size_catches_a_missing_last_member():
    with pytest.raises(ArtifactError, match="group 0 is incomplete: 2 of 3"):
        group_records([make(0, 0), make(0, 1)], group_size=3)


def test_group_records_duplicates_and_mixed_prompts():
    with pytest.raises(ArtifactError, match="group 0 has sample 1 twice"):
        group_records([make(0, 0), make(0, 1), make(0, 1)])
    with pytest.raises(ArtifactError, match="group 0 mixes prompts: sample 1 has a different answer"):
        group_records([make(0, 0), make(0, 1, answer="5")])


def test_require_scored():
    scored = make().with_scores(rewards={}, reward=0.0, advantage=0.0, reward_errors={})
    require_scored([scored])
    with pytest.raises(ArtifactError, match=r"s\.jsonl: record 2 \(group 0, sample 1\) has no rewards"):
        require_scored([scored, make(sample=1)], source="s.jsonl")


def test_records_with_images_are_schema_2_with_paths_relative_to_the_file(tmp_path):
    digest = "ab" * 32
    (tmp_path / "pics").mkdir()
    inside, outside = tmp_path / "pics" / "a.png", tmp_path.parent / "elsewhere.png"
    records = [
        make(images=[{"path": str(inside), "sha256": digest}, {"path": str(outside), "sha256": digest}])
    ]
    records.append(make(sample=1))  # no images: still /1, as before
    path = tmp_path / "r.jsonl"
    write_records(records, path)
    first, second = (json.loads(x) for x in path.read_text().splitlines())
    assert first["schema"] == "mllmjax.rollout/2" and second["schema"] == SCHEMA == "mllmjax.rollout/1"
    assert "images" not in second
    assert first["images"] == [
        {"path": "pics/a.png", "sha256": digest},
        {"path": str(outside), "sha256": digest},
    ]
    assert list(first)[: len(list(second))] == list(second)  # /1's fields, in order, then images
    assert read_records(path) == records  # read back with absolute paths, as in memory
    # the same records written elsewhere keep pointing at the same files
    write_records(read_records(path), tmp_path / "pics" / "again.jsonl")
    assert read_records(tmp_path / "pics" / "again.jsonl") == records


@pytest.mark.parametrize(
    "images, expected",
    [
        ([], "field 'images' must be a non-empty list"),
        ([{"path": "a.png"}], "field 'images' must be a non-empty list"),
        ([{"path": "a.png", "sha256": "12"}], "64-digit hex"),
        ("a.png", "field 'images'"),
    ],
)
def test_bad_images_field(tmp_path, images, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(line(schema="mllmjax.rollout/2", images=images) + "\n")
    with pytest.raises(RecordError, match=expected):
        read_records(path)
    # /1 has no images field; /2 needs one
    path.write_text(line(images=[{"path": "a.png", "sha256": "ab" * 32}]) + "\n")
    with pytest.raises(RecordError, match="unknown field.*images.*schema mllmjax.rollout/1"):
        read_records(path)
    path.write_text(line(schema="mllmjax.rollout/2") + "\n")
    with pytest.raises(RecordError, match="missing field.*images.*schema mllmjax.rollout/2"):
        read_records(path)
