"""Property-based tests (hypothesis) of the two parsers that read what users and models write: the
record reader and the answer extraction of the rewards."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllmjax.errors import RecordError
from mllmjax.records import RolloutRecord, parse_records, read_records, records_to_jsonl, write_records
from mllmjax.rewards import correct_reward, extract_prediction

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(max_size=40)
ids = st.lists(st.integers(0, 200_000), max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
json_scalar = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | finite | text
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8)  # fmt: skip


@st.composite
def records(draw) -> RolloutRecord:
    completion_ids = draw(ids)
    scored = draw(st.booleans())
    rewards = draw(st.dictionaries(st.sampled_from(["correct", "format", "x"]), finite, max_size=3))
    return RolloutRecord(
        prompt_id=draw(st.one_of(text, st.integers(0, 10**9))),
        group=draw(st.integers(0, 10**6)),
        sample=draw(st.integers(0, 10**3)),
        prompt=draw(text),
        prompt_ids=draw(ids),
        completion=draw(text),
        completion_ids=completion_ids,
        logprobs=draw(st.lists(st.floats(-1e4, 0.0), min_size=len(completion_ids), max_size=len(completion_ids))),
        finish_reason=draw(st.sampled_from(["stop", "length"])),
        answer=draw(text),
        policy=draw(text),
        meta=draw(st.dictionaries(text, json_value, max_size=3)),
        rewards=rewards if scored else None,
        reward=draw(finite) if scored else None,
        advantage=draw(finite) if scored else None,
        reward_errors=draw(st.dictionaries(text, text, max_size=2)) if scored else None,
    )  # fmt: skip


@SETTINGS
@given(st.lists(records(), max_size=4))
def test_records_round_trip_through_a_file(batch):
    """write_records -> read_records gives the records back, whatever their text holds (U+0085, U+2028
    and other characters str.splitlines would cut at included: lines end at \\n only)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.jsonl"
        write_records(batch, path)
        assert read_records(path) == batch
        for line in path.read_bytes().split(b"\n")[:-1]:  # strict JSON: no NaN or Infinity tokens
            json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))


@SETTINGS
@given(records(), st.sampled_from([*RolloutRecord.__dataclass_fields__, "schema", "extra"]), json_value)
def test_a_record_with_any_field_replaced_parses_or_names_its_line(record, field, value):
    """Whatever a field is replaced with, the reader returns a valid record or raises RecordError naming
    the file and line, never another exception."""
    obj = json.loads(records_to_jsonl([record]))
    obj[field] = value
    line = json.dumps(obj)
    try:
        (parsed,) = parse_records(["", line], "r.jsonl")
    except RecordError as e:
        assert str(e).startswith("r.jsonl:2: ")
    else:
        assert isinstance(parsed, RolloutRecord)


@SETTINGS
@given(st.lists(st.text(max_size=60), max_size=4))
def test_arbitrary_lines_parse_or_raise_record_error(lines):
    try:
        parse_records(lines, "r.jsonl")
    except RecordError as e:
        assert str(e).startswith("r.jsonl:")


no_tags = st.text(max_size=40).filter(lambda s: "<answer>" not in s and "</answer>" not in s)


@SETTINGS
@given(st.text(max_size=200))
def test_extraction_never_raises(completion):
    assert extract_prediction(completion) is None or isinstance(extract_prediction(completion), str)


@SETTINGS
@given(no_tags, no_tags, no_tags, no_tags)
def test_the_last_answer_block_wins(before, first, x, after):
    completion = f"{before}<answer>{first}</answer> {before}<answer>{x}</answer>{after}"
    assert extract_prediction(completion) == x.strip()


prose = st.text(
    alphabet=st.characters(blacklist_categories=["Nd"], blacklist_characters="\\<>-,."), max_size=30
)


@SETTINGS
@given(prose, st.integers(-(10**9), 10**9), st.booleans(), prose)
def test_the_last_number_is_taken_as_written(before, n, grouped, after):
    """Without answer tags or a box, the prediction is the last number with its sign and separators:
    prose (no digits) around `n`, written plain or with thousands separators."""
    written = f"{n:,}" if grouped else str(n)
    completion = f"{before} so it is {written} {after}"
    assert extract_prediction(completion) == written


@settings(max_examples=40, deadline=None)
@given(st.integers(-(10**7), 10**7), st.booleans(), prose)
def test_correct_accepts_the_gold_number_in_any_of_its_forms(n, grouped, before):
    written = f"{n:,}" if grouped else str(n)
    assert correct_reward(f"{before}<answer>{written}</answer>", str(n), {}) == 1.0
    assert correct_reward(f"{before}<answer>{n + 1}</answer>", str(n), {}) == 0.0
