"""Reward functions, registered by name, and the parsing of `--reward` / `--reward-fn` specs.

Every reward has one signature (custom ones too):

    fn(completion: str, answer: str, record: dict) -> float

`completion` is the generated text, `answer` the gold answer (GSM8K: the text after "####"), `record`
the whole rollout record as its JSON object (schema `mllmjax.rollout/1`: prompt, finish_reason, meta, ...).
A custom reward is any importable function with that signature, named `package.module:function`.

The three built-ins:

- `correct` (1.0 or 0.0): extract the prediction first, then compare. The prediction is the content of the
  last closed `<answer>...</answer>` block; failing that, the last `\\boxed{...}` (balanced braces); failing
  that, the last number in the text, keeping its sign, decimals and thousands separators. Math-verify
  parses nothing useful from `<answer>18</answer>` as written, hence extract-then-parse. Both sides are
  parsed with `math_verify.parse` and compared with `math_verify.verify(gold, prediction)`, the order its
  documentation gives (it is not symmetric). Parsing and verifying run under a time limit; math-verify
  implements that with `signal.alarm`, which works only in a process's main thread, so this reward
  refuses to run elsewhere (scoring then uses worker processes, see `mllmjax.scoring`).
  A gold answer that does not parse is an error (recorded in reward_errors), never a silent 0.
- `format` (1.0 or 0.0): the whole completion is `<think>T</think>\\n<answer>A</answer>` with nothing
  before or after it (not even whitespace), T and A non-blank and
  free of the four tags.
- `tags` (0 to 1): +0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` appearing exactly once.

A reward that raises scores 0 for that record and the error is recorded (`RewardOutcome.errors`), never
a silent -1. Weights come from `correct=1.0,format=0.5,tags=0.5`; a bare name weighs 1.0.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from mllmjax.errors import BadInputError
from mllmjax.settings import DEFAULTS

RewardFn = Callable[[str, str, Mapping[str, Any]], float]

REWARDS: dict[str, RewardFn] = {}
DEFAULT_CORRECT_TIMEOUT_S = 3
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def register_reward(name: str, fn: RewardFn | None = None) -> Any:
    """Register `fn` under `name` (usable as a decorator: `@register_reward("mine")`)."""

    def add(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise BadInputError(f"reward {name!r} is not callable: {f!r}")
        existing = REWARDS.get(name)
        if existing is not None and existing is not f:
            raise BadInputError(f"a different reward is already registered as {name!r}")
        REWARDS[name] = f
        return f

    return add if fn is None else add(fn)


# --------------------------------------------------------------------------------------- extraction

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number: thousands-grouped (1,234,567.5) or plain (1234.5); the sign is handled in last_number.
_NUMBER = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?![\d])")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if there is none."""
    found = None
    for m in _BOXED.finditer(text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    found = text[start:i]
                    break
    return found


def last_number(text: str) -> str | None:
    """The last number in `text`, with its thousands separators and decimals as written.

    A leading minus counts as a sign only when it does not follow a digit, letter or closing bracket, so
    `12-5` gives `5` but `is -5` and `(-5)` give `-5`.
    """
    found = None
    for m in _NUMBER.finditer(text):
        start = m.start()
        sign = ""
        if start > 0 and text[start - 1] == "-":
            before = text[start - 2] if start > 1 else ""
            if not (before.isalnum() or before in ")]}"):
                sign = "-"
        found = sign + m.group(1)
    return found


def extract_prediction(completion: str) -> str | None:
    """The predicted final answer: `<answer>` content, else `\\boxed{}`, else the last number."""
    blocks = _ANSWER_BLOCK.findall(completion)
    if blocks:
        return blocks[-1].strip()
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    return last_number(completion)


# ------------------------------------------------------------------------------------------ time limits

_custom_timeout_s: float | None = None


class RewardTimeout(BaseException):
    """A custom reward ran past its time limit (a BaseException: reward code that catches Exception
    cannot swallow it)."""


def check_custom_timeout(seconds: float | None) -> None:
    """A custom-reward time limit must be None or a number of seconds > 0 (and < 1e6)."""
    if seconds is not None and not (
        isinstance(seconds, int | float) and not isinstance(seconds, bool) and 0 < seconds < 1e6
    ):
        raise BadInputError(f"--reward-timeout must be a number of seconds > 0, got {seconds!r}")


def set_custom_timeout(seconds: float | None) -> None:
    """Time limit of each custom reward call (None: none), enforced with a SIGALRM interval timer."""
    global _custom_timeout_s
    check_custom_timeout(seconds)
    _custom_timeout_s = None if seconds is None else float(seconds)


def _raise_timeout(signum: int, frame: Any) -> None:
    raise RewardTimeout(f"ran past the {_custom_timeout_s:g} s limit (--reward-timeout)")


def _call_limited(fn: RewardFn, completion: str, answer: str, record: Mapping[str, Any]) -> Any:
    """fn(...) under the custom-reward time limit. Needs the main thread (signals are delivered there):
    scoring off it uses a worker process, whose main thread runs the rewards."""
    seconds = _custom_timeout_s
    if seconds is None or threading.current_thread() is not threading.main_thread():
        return fn(completion, answer, record)
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(completion, answer, record)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------ correct

_correct_timeout_s = DEFAULT_CORRECT_TIMEOUT_S


def set_correct_timeout(seconds: int) -> None:
    """Time limit (whole seconds: math-verify uses signal.alarm) for each parse and each verify."""
    global _correct_timeout_s
    if type(seconds) is not int or seconds < 1:
        raise BadInputError(
            f"the correct-reward time limit must be a whole number of seconds >= 1, got {seconds!r}"
        )
    _correct_timeout_s = seconds


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int) -> list[Any]:
    # G samples share one gold answer, so caching it saves a parse per sample.
    from math_verify import parse

    return parse(gold, parsing_timeout=timeout_s, raise_on_error=True)


def correct_reward(completion: str, answer: str, record: Mapping[str, Any]) -> float:
    """1.0 if the extracted prediction equals the gold answer under math-verify, else 0.0."""
    from math_verify import parse, verify

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "the correct reward needs the main thread (math-verify's time limit uses signal.alarm); "
            "score with worker processes"
        )
    timeout_s = _correct_timeout_s
    gold = _parse_gold(answer.strip(), timeout_s)
    if not gold:
        raise ValueError(f"the gold answer {answer!r} does not parse")
    prediction = extract_prediction(completion)
    if not prediction:
        return 0.0
    parsed = parse(prediction, parsing_timeout=timeout_s, raise_on_error=True)
    if not parsed:
        return 0.0
    return 1.0 if verify(gold, parsed, timeout_seconds=timeout_s, raise_on_error=True) else 0.0


# ------------------------------------------------------------------------------------ format & tags

_NO_TAG = r"(?:(?!</?think>|</?answer>).)"
_FORMAT = re.compile(rf"<think>({_NO_TAG}*)</think>\n<answer>({_NO_TAG}*)</answer>", re.DOTALL)


def format_reward(completion: str, answer: str, record: Mapping[str, Any]) -> float:
    """1.0 if the whole completion is `<think>...</think>\\n<answer>...</answer>`, else 0.0."""
    m = _FORMAT.fullmatch(completion)
    return 1.0 if m and m.group(1).strip() and m.group(2).strip() else 0.0


def tags_reward(completion: str, answer: str, record: Mapping[str, Any]) -> float:
    """+0.25 for each of the four tags that appears exactly once."""
    return 0.25 * sum(completion.count(tag) == 1 for tag in TAGS)


register_reward("correct", correct_reward)
register_reward("format", format_reward)
register_reward("tags", tags_reward)
# The built-in rewards: they need no record and no time limit of ours (correct has math-verify's).
BUILTIN_FNS = frozenset({correct_reward, format_reward, tags_reward})


# ----------------------------------------------------------------------------------- specs & running


def load_reward_fn(spec: str) -> tuple[str, RewardFn]:
    """Import `package.module:function`; the reward is named after the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise BadInputError(f"custom reward {spec!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInputError(f"custom reward {spec!r}: cannot import {module_name!r} ({e})") from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # the module's own code failed (SystemExit included): bad input, one line
        message = " ".join(str(e).split())[:200]
        raise BadInputError(
            f"custom reward {spec!r}: importing {module_name!r} raised {type(e).__name__}"
            + (f": {message}" if message else "")
        ) from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise BadInputError(f"custom reward {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise BadInputError(f"custom reward {spec!r} is not callable")
    return attr.rsplit(".", 1)[-1], fn


# The largest magnitude of a reward value or weight: products, group means and variances of such
# numbers stay far from float64's overflow (a reward of 1e308 made the summary print inf).
MAX_REWARD = 1e9


def _parse_weight(text: str, item: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise BadInputError(f"reward weight in {item!r} is not a number") from None
    if not abs(weight) <= MAX_REWARD:
        raise BadInputError(
            f"reward weight in {item!r} must be a finite number of magnitude <= {MAX_REWARD:g}"
        )
    return weight


def parse_reward_weights(spec: str) -> tuple[tuple[str, float], ...]:
    """`correct=1.0,format=0.5,tags=0.5` -> (("correct", 1.0), ...). A bare name weighs 1.0; a
    `package.module:function[=w]` item names a custom reward. Names are checked by `resolve_rewards`."""
    out: list[tuple[str, float]] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, weight = item.rpartition("=") if "=" in item else (item, "", "")
        name = name.strip()
        if not name:
            raise BadInputError(f"reward item {item!r} has no name (expected name=weight)")
        out.append((name, _parse_weight(weight, item) if sep else 1.0))
    if not out:
        raise BadInputError(f"no rewards in {spec!r} (expected e.g. {DEFAULTS.reward})")
    names = [n for n, _ in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadInputError(f"reward(s) named twice in {spec!r}: {', '.join(duplicates)}")
    return tuple(out)


def resolve_rewards(weights: tuple[tuple[str, float], ...]) -> tuple[tuple[str, RewardFn, float], ...]:
    """Look each name up in the registry (importing `module:function` items); unknown names raise
    BadInputError listing the known ones."""
    out: list[tuple[str, RewardFn, float]] = []
    for name, weight in weights:
        if ":" in name:
            # not registered: a custom reward lives for this run only and never shadows a built-in
            short, fn = load_reward_fn(name)
            out.append((short, fn, weight))
            continue
        fn = REWARDS.get(name)
        if fn is None:
            raise BadInputError(
                f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))} "
                "(or a custom one as package.module:function)"
            )
        out.append((name, fn, weight))
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise BadInputError(f"two rewards share a name: {', '.join(names)}")
    return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardOutcome:
    """The rewards of one completion: values by name (0 where the reward raised) and the errors."""

    values: dict[str, float]
    errors: dict[str, str]


def evaluate_rewards(
    rewards: tuple[tuple[str, RewardFn, float], ...], completion: str, answer: str, record: Mapping[str, Any]
) -> RewardOutcome:
    """Run every reward on one completion; a reward that raises, runs past its time limit
    (`set_custom_timeout`) or returns a non-number, a non-finite number or one of magnitude above
    MAX_REWARD scores 0 and is recorded."""
    values: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, fn, _ in rewards:
        try:
            builtin = fn in BUILTIN_FNS  # correct has its own time limit
            value = (
                fn(completion, answer, record) if builtin else _call_limited(fn, completion, answer, record)
            )
            if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= MAX_REWARD:
                raise TypeError(
                    f"returned {value!r}, expected a finite number of magnitude <= {MAX_REWARD:g}"
                )
            values[name] = float(value)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # math-verify's TimeoutException derives from BaseException
            values[name] = 0.0
            message = " ".join(str(e).split())
            errors[name] = f"{type(e).__name__}: {message[:300]}" if message else type(e).__name__
    return RewardOutcome(values=values, errors=errors)
