"""Data sources: gold extraction, files with custom fields, errors that name file and line, deterministic
selection, the hub path (datasets monkeypatched: no network in tests) and the built-in tasks."""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

import pytest
from shared_data import SHARED, require_shared

from mllmjax.data import Problem, extract_gold, load_problems, resolve_spec
from mllmjax.data import builtin as B
from mllmjax.errors import BadInputError, RecordError

GSM8K_DIR = SHARED / "data" / "gsm8k"

GSM8K_FIXTURE = [
    {
        "question": "Janet has 16 eggs and eats 3. How many are left?",
        "answer": "She has 16 - 3 = <<16-3=13>>13 left.\n#### 13",
    },
    {
        "question": "A farm sells 1,000 apples a day for 2 days. How many apples?",
        "answer": "1,000 * 2 = <<1000*2=2000>>2,000\n#### 2,000",
    },
    {"question": "What is 5 - 8?", "answer": "5 - 8 = -3\n#### -3"},
    {"question": "Half of 7?", "answer": "7 / 2 = 3.5\n#### 3.5 "},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- gold answers


@pytest.mark.parametrize(
    "raw, gold",
    [
        ("He pays 1,234 dollars.\n#### 1,234", "1234"),
        ("#### 1,234,567", "1234567"),
        ("x\n####  18 \n", "18"),
        ("#### -3", "-3"),
        ("#### 3.5", "3.5"),
        ("a #### 1 then\n#### 2", "2"),  # the last marker is the answer
        ("42", "42"),  # no marker: the field is the gold itself
        (" 7 ", "7"),
        (42, "42"),
        ("#### 3, 4", "3, 4"),  # a list is not a thousands separator
        ("#### 12,34", "12,34"),
    ],
)
def test_extract_gold(raw, gold):
    assert extract_gold(raw) == gold


def test_extract_gold_rejects_non_text():
    with pytest.raises(ValueError, match="list"):
        extract_gold([1])


# ---------------------------------------------------------------- files


def test_jsonl_gsm8k_fields(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", GSM8K_FIXTURE)
    problems = load_problems(str(path))
    assert [p.answer for p in problems] == ["13", "2000", "-3", "3.5"]
    assert problems[0].question == GSM8K_FIXTURE[0]["question"]
    assert problems[0].meta == GSM8K_FIXTURE[0]
    assert [p.id for p in problems] == [f"g.jsonl:{i}" for i in range(4)]


def test_jsonl_custom_fields_and_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "1+1?", "target": 2}\n\n{"prompt": "2+2?", "target": "4"}\n')
    problems = load_problems(str(path), question_field="prompt", answer_field="target")
    assert [(p.question, p.answer) for p in problems] == [("1+1?", "2"), ("2+2?", "4")]


def test_parquet_custom_fields(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    table = pa.table({"problem": ["3*3?", "10-1?"], "solution": ["#### 9", "#### 9"], "extra": [1, 2]})
    pq.write_table(table, path)
    problems = load_problems(str(path), question_field="problem", answer_field="solution")
    assert [(p.question, p.answer) for p in problems] == [("3*3?", "9"), ("10-1?", "9")]
    assert problems[1].meta == {"problem": "10-1?", "solution": "#### 9", "extra": 2}
    with pytest.raises(BadInputError, match=r"d\.parquet: row 1: no field 'question'"):
        load_problems(str(path))


def test_json_array_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(GSM8K_FIXTURE[:2]))
    assert [p.answer for p in load_problems(str(path))] == ["13", "2000"]


def test_directory_picks_split_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GSM8K_FIXTURE[:1])
    write_jsonl(tmp_path / "test.jsonl", GSM8K_FIXTURE[1:])
    assert len(load_problems(str(tmp_path), split="train")) == 1
    assert len(load_problems(str(tmp_path), split="test")) == 3
    with pytest.raises(BadInputError, match="no validation.jsonl"):
        load_problems(str(tmp_path), split="validation")


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GSM8K_FIXTURE[0]) + "\n\n" + '{"question": "x", "answer": \n')
    with pytest.raises(RecordError) as err:
        load_problems(str(path))
    assert err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: not valid JSON")


def test_missing_field_names_file_line_and_fields(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps(GSM8K_FIXTURE[0]) + "\n" + json.dumps({"question": "q", "solution": "1"}) + "\n"
    )
    with pytest.raises(RecordError, match=r"m\.jsonl:2: no field 'answer' \(fields: question, solution\)"):
        load_problems(str(path))


@pytest.mark.parametrize(
    "record, match",
    [
        ({"question": "", "answer": "1"}, "field 'question' must be non-empty text"),
        ({"question": "q", "answer": "#### "}, "field 'answer' holds no gold answer"),
        ({"question": "q", "answer": None}, "field 'answer': answer must be text or a number"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_record_values(tmp_path, record, match):
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(RecordError, match=rf"v\.jsonl:1: {match}"):
        load_problems(str(path))


def test_missing_file_and_unknown_spec(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_problems(str(tmp_path / "nope.jsonl"))
    with pytest.raises(BadInputError, match="cannot tell what --data 'nonsense'"):
        load_problems("nonsense")


def test_empty_file(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("\n")
    with pytest.raises(BadInputError, match="holds no problems"):
        load_problems(str(path))


# ---------------------------------------------------------------- selection


def test_offset_num_and_deterministic_shuffle(tmp_path):
    records = [{"question": f"q{i}", "answer": str(i)} for i in range(50)]
    path = str(write_jsonl(tmp_path / "n.jsonl", records))
    plain = load_problems(path, offset=10, num=5)
    assert [p.answer for p in plain] == ["10", "11", "12", "13", "14"]
    a = load_problems(path, shuffle=True, seed=3)
    b = load_problems(path, shuffle=True, seed=3)
    c = load_problems(path, shuffle=True, seed=4)
    assert a == b
    assert [p.answer for p in a] != [p.answer for p in c]
    assert sorted(int(p.answer) for p in a) == list(range(50))
    assert [p.answer for p in a] != [str(i) for i in range(50)]
    # A slice of the shuffled order is that slice, whatever the window.
    assert load_problems(path, shuffle=True, seed=3, offset=7, num=4) == a[7:11]
    assert len(load_problems(path, offset=48, num=10)) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num": 0}, "--num-prompts must be a positive integer"),
        ({"offset": -1}, "--offset must be a non-negative integer"),
        ({"offset": 4}, "--offset 4 is past the end"),
    ],
)
def test_bad_selection(tmp_path, kwargs, match):
    path = str(write_jsonl(tmp_path / "s.jsonl", GSM8K_FIXTURE))
    with pytest.raises(BadInputError, match=match):
        load_problems(path, **kwargs)


# ---------------------------------------------------------------- hub


def test_resolve_spec():
    assert (resolve_spec("gsm8k").kind, resolve_spec("gsm8k").name, resolve_spec("gsm8k").config) == (
        "hub",
        "openai/gsm8k",
        "main",
    )
    s = resolve_spec("owner/name:cfg")
    assert (s.kind, s.name, s.config) == ("hub", "owner/name", "cfg")
    assert resolve_spec("owner/name").config is None
    assert resolve_spec("builtin:arith").kind == "builtin"


def test_hub_failure_is_one_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def unreachable(name, config=None, split=None):
        calls.append((name, config, split))
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(BadInputError) as err:
        load_problems("gsm8k", split="test")
    assert calls == [("openai/gsm8k", "main", "test")]
    message = str(err.value)
    assert "\n" not in message
    assert "could not fetch hub dataset openai/gsm8k (config 'main'), split 'test'" in message
    assert "Couldn't reach" in message
    assert "local .jsonl/.parquet file" in message


def test_hub_records_become_problems(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None: list(GSM8K_FIXTURE))
    problems = load_problems("someone/math:default", split="train", num=2)
    assert [p.answer for p in problems] == ["13", "2000"]
    assert problems[1].id == "someone/math:default:train:1"
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None: [{"q": "x"}])
    with pytest.raises(BadInputError, match=r"someone/math \(train\) record 0: no field 'question'"):
        load_problems("someone/math")


# ---------------------------------------------------------------- GSM8K itself


def _check_plain_golds(problems: list[Problem]) -> None:
    for p in problems:
        assert re.fullmatch(r"-?\d+(\.\d+)?", p.answer), (p.id, p.answer)
        assert p.answer.replace(",", "") == p.answer


def test_gsm8k_test_split_golds_are_plain_numbers():
    problems = load_problems(str(require_shared(GSM8K_DIR)), split="test")
    assert len(problems) == 1319
    _check_plain_golds(problems)


def test_gsm8k_format_fixture_golds_are_plain_numbers(tmp_path):
    """The same checks on our own GSM8K-format rows, which run wherever the shared data is absent too."""
    problems = load_problems(str(write_jsonl(tmp_path / "test.jsonl", GSM8K_FIXTURE)), split="test")
    assert [p.answer for p in problems] == ["13", "2000", "-3", "3.5"]
    _check_plain_golds(problems)


# ---------------------------------------------------------------- built-in tasks

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _evaluate(expression: str) -> int:
    """An independent evaluator for the generator's `+ - *` expressions (no eval of arbitrary text)."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise AssertionError(f"unexpected expression {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


@pytest.mark.parametrize("task", sorted(B.BUILTIN_TASKS))
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_builtin_answers_are_verifiable(task, level):
    problems = load_problems(f"builtin:{task}:level={level}", num=300, shuffle=True, seed=1)
    for p in problems:
        expression = p.meta["expression"]
        assert int(p.answer) == _evaluate(expression) >= 0
        # The numbers the expression uses are the numbers the question states, in order.
        assert re.findall(r"\d+", expression) == re.findall(r"\d+", p.question), p.question
        if task == "sums":
            assert p.question == f"What is {expression}?"


def test_builtin_is_deterministic_and_seeded():
    a = load_problems("builtin:arith", num=20)
    assert a == load_problems("builtin:arith:level=1,seed=0", num=20)
    assert [p.id for p in a[:2]] == [
        "builtin:arith:level=1,seed=0:train:0",
        "builtin:arith:level=1,seed=0:train:1",
    ]
    other = load_problems("builtin:arith:seed=1", num=20)
    assert [p.question for p in a] != [p.question for p in other]
    # Any window is generated without the problems before it and equals the same slice of the whole.
    assert load_problems("builtin:arith", offset=15, num=5) == a[15:20]
    shuffled = load_problems("builtin:arith", shuffle=True, seed=2, num=20)
    assert shuffled == load_problems("builtin:arith", shuffle=True, seed=2, num=20)
    assert shuffled != a
    # Pinned values: a change to the generator changes every run's data; make it on purpose.
    assert (a[0].question, a[0].answer) == (
        "There are 19 pencils in a box and 20 pencils on the table. How many pencils are there altogether?",
        "39",
    )
    assert [(p.question, p.answer) for p in load_problems("builtin:sums", num=1)] == [
        ("What is 14 - 5?", "9")
    ]
    assert load_problems("builtin:sums", split="test", num=1)[0].answer == "8"


@pytest.mark.parametrize("task", sorted(B.BUILTIN_TASKS))
def test_builtin_train_and_test_never_share_a_question(task):
    train = load_problems(f"builtin:{task}", split="train", num=5000)
    test = load_problems(f"builtin:{task}", split="test")
    assert len(test) == B.SPLIT_SIZES["test"]
    train_q, test_q = {p.question for p in train}, {p.question for p in test}
    assert not train_q & test_q
    assert all(B.split_of(q) == "train" for q in train_q)
    assert all(B.split_of(q) == "test" for q in test_q)
    # Variety: word problems hardly repeat; level-1 sums have only ~540 distinct questions (two numbers
    # 2..20, + or -), so their test tenth repeats its ~55 a few times each; still disjoint from train.
    assert len(test_q) > (0.9 * len(test) if task == "arith" else 45)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("builtin:nope", r"unknown built-in task 'nope'; known: arith, count, read, sums"),
        ("builtin:arith:level=9", "level must be an integer 0..3, got 9"),
        ("builtin:arith:level=x", "option level in 'builtin:arith:level=x' must be an integer"),
        ("builtin:arith:depth=2", "bad option 'depth=2'"),
        ("builtin:arith:seed=-1", "seed must be a non-negative integer"),
    ],
)
def test_builtin_bad_specs(spec, match):
    with pytest.raises(BadInputError, match=match):
        load_problems(spec, num=1)


def test_builtin_rejects_fields_and_unknown_split():
    with pytest.raises(BadInputError, match="do not apply to built-in"):
        load_problems("builtin:sums", question_field="q", num=1)
    with pytest.raises(BadInputError, match="splits train, test, got 'validation'"):
        load_problems("builtin:sums", split="validation", num=1)


def test_problem_validates():
    with pytest.raises(BadInputError, match="gold answer must be non-empty"):
        Problem(id="x", question="q", answer=" ")
