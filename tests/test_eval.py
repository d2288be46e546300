"""`mllmjax eval`: the metric definitions on hand-made completions, and the command end to end on a tiny
model: greedy completions against transformers' greedy decoding, pass@1, pass@k and maj@k against a recount."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from hf_models import save_hf_model
from typer.testing import CliRunner

from mllmjax.convert import convert
from mllmjax.evaluation import summarize
from mllmjax.prompts import EXAMPLES, SYSTEM_PROMPT
from mllmjax.records import RolloutRecord
from mllmjax_cli.main import app


def rec(group: int, sample: int, completion: str, answer: str, finish: str = "stop") -> RolloutRecord:
    return RolloutRecord(
        prompt_id=f"p{group}", group=group, sample=sample, prompt="q", prompt_ids=[1], completion=completion,
        completion_ids=[1] * (sample + 1), logprobs=[-1.0] * (sample + 1), finish_reason=finish, answer=answer,
        policy="t",
    )  # fmt: skip


def test_metrics_by_hand():
    ok = "<think>\nx\n</think>\n<answer>{}</answer>"
    records = [
        # problem 0: 1 of 3 right; the majority (7, twice) is wrong
        rec(0, 0, ok.format(7), "5"), rec(0, 1, "so 7", "5"), rec(0, 2, ok.format(5), "5", "length"),
        # problem 1: majority 1,200 (as "1200" and "1,200") is right
        rec(1, 0, ok.format("1,200"), "1200"), rec(1, 1, "it is 1200", "1200"), rec(1, 2, "no idea", "1200"),
        # problem 2: nothing right, no predictions at all
        rec(2, 0, "hm", "3"), rec(2, 1, "hmm", "3"), rec(2, 2, "?", "3"),
    ]  # fmt: skip
    result, per = summarize(records)
    assert result.problems == 3 and result.k == 3
    assert result.pass_at_1 == pytest.approx(3 / 9)
    assert result.pass_at_k == pytest.approx(2 / 3)
    assert result.maj_at_k == pytest.approx(1 / 3)
    assert result.format_rate == pytest.approx(3 / 9)
    assert result.truncation_rate == pytest.approx(1 / 9)
    assert result.mean_tokens == pytest.approx(2.0)
    assert [p["correct"] for p in per[:3]] == [0.0, 0.0, 1.0]


def test_tie_goes_to_the_first_answer_seen():
    records = [rec(0, 0, "<answer>4</answer>", "4"), rec(0, 1, "<answer>9</answer>", "4")]
    assert summarize(records)[0].maj_at_k == 1.0
    records = [rec(0, 0, "<answer>9</answer>", "4"), rec(0, 1, "<answer>4</answer>", "4")]
    assert summarize(records)[0].maj_at_k == 0.0


@pytest.mark.parametrize(
    "answers,gold,maj",
    [
        ("9 4 4 7", "4", 1.0),  # 9 seen first, 4 outvotes it
        ("4 9 9 9", "4", 0.0),  # 4 seen first, 9 outvotes it
        ("5 - 3 3", "5", 0.0),  # a completion without an answer does not vote
        ("3 5 5 3", "3", 1.0),  # a 2-2 tie goes to the answer seen first
        ("8 1 - 2", "1", 0.0),  # every answer once: the first
        ("7 1,200 1200 5", "1200", 1.0),  # 1,200 and 1200 are one answer with two votes
    ],
)
def test_majority_is_the_most_common_answer(answers, gold, maj):
    texts = [
        "no idea" if a == "-" else f"<answer>{a}</answer>" if i % 2 else f"so {a}"
        for i, a in enumerate(answers.split())
    ]
    result, _ = summarize([rec(0, i, text, gold) for i, text in enumerate(texts)])
    assert result.maj_at_k == maj
    assert result.pass_at_k == 1.0  # the gold is among the answers every time


# ------------------------------------------------------------ end to end, against an independent reference
# A tiny random Qwen3 (seed 2) whose greedy continuations end in different numbers for different questions:
# its word-level vocabulary is w0 .. w118, so a completion's last number is the index of its last w-token,
# and gold answers chosen from transformers' own greedy output make some problems right and some wrong.
QUESTIONS = ["w1 w2", "hi w3", "w4", "w5 w6 w7", "w8 w9", "w10", "hi", "w11 w12"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = save_hf_model("qwen3", folder / "hf", seed=2)
    convert(str(folder / "hf"), folder / "ck")
    return folder, model


def _last_number(text: str) -> str | None:
    found = re.findall(r"\d+", text)  # the completions hold no signs, decimals or separators
    return found[-1] if found else None


def _write_problems(path, answers):
    path.write_text(
        "".join(
            json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(QUESTIONS, answers, strict=True)
        )
    )


def _eval(folder, data, *extra):
    res = CliRunner().invoke(
        app, ["eval", str(folder / "ck"), "--data", str(data), "--json", "-o", str(data.with_suffix(".out")),
              "--force", *extra],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    numbers = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))
    records = [json.loads(line) for line in data.with_suffix(".out").read_text().splitlines()]
    return numbers, records


def test_greedy_accuracy_matches_transformers_greedy(tiny):
    """Default eval (k=1) decodes greedily: each completion is transformers' greedy continuation of the
    chat-templated prompt, and pass@1 is the hand count of problems whose gold is that completion's
    last number."""
    import torch
    from transformers import AutoTokenizer

    folder, model = tiny
    tok = AutoTokenizer.from_pretrained(folder / "hf")
    stops = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
    max_new = 6
    want_ids, preds = [], []
    for q in QUESTIONS:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for eq, er in EXAMPLES:
            messages += [{"role": "user", "content": eq}, {"role": "assistant", "content": er}]
        messages.append({"role": "user", "content": q})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=max_new, eos_token_id=stops, pad_token_id=stops[0],
            )  # fmt: skip
        ids = out[0, len(prompt) :].tolist()
        want_ids.append((prompt, ids))
        preds.append(_last_number(tok.decode(ids, skip_special_tokens=True)))
    # Even problems get their greedy answer as gold, odd ones a different number.
    golds = [p if i % 2 == 0 else str(int(p or 0) + 1) for i, p in enumerate(preds)]
    right = sum(i % 2 == 0 and p is not None for i, p in enumerate(preds))
    assert 0 < right < len(QUESTIONS) and len(set(preds)) > 1, preds  # a test that can tell right from wrong
    _write_problems(folder / "greedy.jsonl", golds)

    numbers, records = _eval(folder, folder / "greedy.jsonl", "--max-new-tokens", str(max_new))
    assert numbers["temperature"] == 0.0 and numbers["k"] == 1 and numbers["problems"] == len(QUESTIONS)
    for r, (prompt, ids) in zip(records, want_ids, strict=True):
        assert r["prompt_ids"] == prompt
        assert r["completion_ids"] == ids
        assert r["completion"] == tok.decode(ids, skip_special_tokens=True)
    assert numbers["pass_at_1"] == pytest.approx(right / len(QUESTIONS))
    assert numbers["pass_at_k"] == numbers["maj_at_k"] == numbers["pass_at_1"]


def _pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _majority(answers: list[str | None]) -> str | None:
    """The most common answer; a tie goes to the one seen first; completions without one do not vote."""
    votes = [a for a in answers if a is not None]
    if not votes:
        return None
    counts = Counter(votes)
    return max(votes, key=lambda a: (counts[a], -votes.index(a)))


def test_sampled_pass_and_majority_against_a_recount(tiny):
    """-k 6 at temperature 1 (top-k 2, so answers repeat): pass@1, pass@k and maj@k equal a recount from
    the completions eval writes, with gold answers picked from a first run of the same seed so that the
    majority vote, the first answer seen and a minority answer disagree."""
    folder, _ = tiny
    k, args = 6, ("-k", "6", "--top-k", "2", "--max-new-tokens", "3", "--seed", "3")
    _write_problems(folder / "probe.jsonl", ["1"] * len(QUESTIONS))
    _, probe = _eval(folder, folder / "probe.jsonl", *args)
    answers = [
        [_last_number(r["completion"]) for r in probe if r["group"] == g] for g in range(len(QUESTIONS))
    ]
    assert all(len(a) == k for a in answers)
    # Gold answers: the majority where it outvotes the first answer seen (maj@k right only if the vote
    # counts), else an answer in the minority (pass@k right, maj@k wrong), else one never sampled.
    golds, kinds = [], []
    for a in answers:
        counts = Counter(x for x in a if x is not None)
        top = _majority(a)
        minority = [x for x in counts if x != top]
        if top is not None and counts[top] > counts[a[0]]:
            golds.append(top), kinds.append("outvotes the first")
        elif minority:
            golds.append(minority[0]), kinds.append("minority")
        else:
            golds.append("117" if top == "118" else "118"), kinds.append("never sampled")
    assert {"outvotes the first", "minority"} <= set(kinds), (answers, kinds)
    _write_problems(folder / "sampled.jsonl", golds)

    numbers, records = _eval(folder, folder / "sampled.jsonl", *args)
    same_seed = [r["completion_ids"] for r in records], [r["completion_ids"] for r in probe]
    assert same_seed[0] == same_seed[1]
    assert numbers["temperature"] == 1.0 and numbers["k"] == k
    correct = np.array([[x == gold for x in a] for a, gold in zip(answers, golds, strict=True)])
    assert numbers["pass_at_1"] == pytest.approx(correct.mean())
    assert numbers["pass_at_k"] == pytest.approx(np.mean([_pass_at_k(k, c, k) for c in correct.sum(1)]))
    maj = np.mean([_majority(a) == gold for a, gold in zip(answers, golds, strict=True)])
    assert numbers["maj_at_k"] == pytest.approx(maj)
    assert 0 < maj < numbers["pass_at_k"] <= 1


def test_eval_command(tiny, tmp_path):
    """A built-in task (its test split) through the command; greedy by default and the numbers themselves
    are checked above."""
    runner = CliRunner()
    args = [
        "eval",
        str(tiny[0] / "ck"),
        "--data",
        "builtin:sums",
        "--num-prompts",
        "3",
        "--max-new-tokens",
        "4",
    ]
    result = runner.invoke(app, [*args, "--json", "-k", "2", "-o", str(tmp_path / "e.jsonl")])
    assert result.exit_code == 0, result.output
    numbers = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert numbers["problems"] == 3 and numbers["k"] == 2 and numbers["temperature"] == 1.0
    assert numbers["split"] == "test"
    assert 0 <= numbers["pass_at_1"] <= numbers["pass_at_k"] <= 1
    assert len((tmp_path / "e.jsonl").read_text().splitlines()) == 6
    bad = runner.invoke(app, [*args, "-k", "0"])
    assert bad.exit_code == 2 and "-k" in bad.output
