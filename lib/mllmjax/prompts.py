"""The system prompt and the way a question becomes the text the model continues.

Design decisions:

- One constant, `SYSTEM_PROMPT`, written in our own words. It asks for reasoning inside `<think>` with a
  recall part (the facts the question gives) and a verify part (working them out and checking), then
  the final answer alone inside `<answer>`, which is what the format and correct rewards look for.
- Two worked examples of the exact output format (`EXAMPLES`) go before the question as earlier
  user/assistant turns: a small instruct model given only a description of the tags writes almost no
  `<answer>` tag, and an example inside the system prompt barely helps, while the same examples as chat
  turns make it write the format most of the time (scripts/measure_default_task.py measures it). The
  examples restate the answer after the check ("so 23 is right"): with a bare check the model often
  copied the check's number into `<answer>`.
- `build_prompt` uses the tokenizer's chat template with the generation prompt added, so the completion
  starts where the assistant's reply does. A base model without a chat template gets a plain
  "system text / Question: ... Answer: ..." layout instead, so any tokenizer works.
- The prompt can be replaced from a UTF-8 text file (`load_system_prompt`); an empty file is refused,
  since an empty system prompt is almost always a mistake (pass `system=""` in code to mean it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllmjax.errors import BadInputError

SYSTEM_PROMPT = """\
You solve math questions. Reply in exactly this form and write nothing after it:
<think>
Recall: the facts and numbers the question gives, one by one.
Verify: work the answer out step by step, then check it a second way.
</think>
<answer>the final number only</answer>"""

EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "A shelf has 14 books. Mia puts 9 more books on it. How many books are on the shelf now?",
        "<think>\nRecall: The shelf has 14 books. Mia puts 9 more books on it.\n"
        "Verify: 14 + 9 = 23. Check: 23 - 9 = 14, so 23 is right.\n</think>\n<answer>23</answer>",
    ),
    (
        "What is 12 - 5?",
        "<think>\nRecall: The numbers are 12 and 5, and we subtract 5 from 12.\n"
        "Verify: 12 - 5 = 7. Check: 7 + 5 = 12, so 7 is right.\n</think>\n<answer>7</answer>",
    ),
)
"""Worked examples shown as earlier user/assistant turns (question, reply in the exact format)."""

PLAIN_TEMPLATE = "Question: {question}\nAnswer:{reply}"
"""One question/answer block for tokenizers without a chat template (base models): the system text, the
examples and the question follow each other separated by blank lines; the completion starts after the
last "Answer:"."""


def load_system_prompt(path: str | Path | None) -> str:
    """The system prompt: `SYSTEM_PROMPT`, or the text of `path` (UTF-8, surrounding whitespace kept
    except one trailing newline) when a path is given."""
    if path is None:
        return SYSTEM_PROMPT
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"system prompt file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read system prompt file {str(p)!r}: {e}") from None
    # Editors add a final newline; it is not part of the prompt the user meant.
    if text.endswith("\n"):
        text = text[:-1]
    if not text.strip():
        raise BadInputError(f"system prompt file {str(p)!r} is empty")
    return text


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (instruct models do, most base models do not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    tokenizer: Any,
    question: str,
    system: str = SYSTEM_PROMPT,
    examples: Sequence[tuple[str, str]] = EXAMPLES,
) -> str:
    """The text the model continues for `question`: the tokenizer's chat template over a system turn
    (left out when `system` is empty), one user/assistant pair per example, the user's question and the
    assistant's generation prompt; or `PLAIN_TEMPLATE` blocks when the tokenizer has no chat template
    (`tokenizer=None` gives that layout too, which is how the CLI shows the prompt).

    The returned string already holds any special tokens the template writes (such as a BOS token), so
    encode it with `add_special_tokens=False`.
    """
    if not isinstance(question, str) or not question.strip():
        raise BadInputError(f"a question must be non-empty text, got {question!r}")
    for ex in examples:
        if len(ex) != 2 or not all(isinstance(t, str) and t.strip() for t in ex):
            raise BadInputError(f"a prompt example must be a (question, reply) pair of texts, got {ex!r}")
    if not has_chat_template(tokenizer):
        shots = "".join(PLAIN_TEMPLATE.format(question=q, reply=" " + r) + "\n\n" for q, r in examples)
        head = f"{system}\n\n" if system else ""
        return head + shots + PLAIN_TEMPLATE.format(question=question, reply="")
    messages = [{"role": "system", "content": system}] if system else []
    for q, r in examples:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    messages.append({"role": "user", "content": question})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors come in many types; all mean the template cannot take this
        raise BadInputError(f"the tokenizer's chat template failed on a system+user conversation: {e}") from e
    if not isinstance(text, str):
        raise BadInputError(f"the tokenizer's chat template returned {type(text).__name__}, not text")
    return text
