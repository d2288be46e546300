"""Built-in offline tasks: arithmetic word problems generated from a seed, with exact integer answers.

Design decisions:

- Problem `i` of a split is a pure function of (task, level, dataset seed, split, i): its own
  `random.Random` is seeded from a SHA-256 of those, so any slice of a split is generated without the
  problems before it, on any machine and Python version (no `hash()` randomisation, no numpy RNG
  version drift).
- Train and test never share a question: every question is assigned to a split by a SHA-256 of its text
  (one in `TEST_BUCKETS` of `BUCKETS` buckets goes to test), and generation redraws until it lands in
  its own split. Seed ranges alone would not do this: two seeds can draw the same small sum.
- Each problem keeps the arithmetic expression it was built from in `meta["expression"]`, so tests
  (and users) can check the answer independently of the generator.
- Two text tasks: `arith` (word problems) and `sums` (bare expressions, "What is 17 - 8?"). Levels set
  the difficulty: 0 is one addition or subtraction with numbers up to 9, 1 the same up to 20, 2 adds
  multiplication and larger numbers, 3 chains two operations. The embedded default is `arith` level 0,
  the one where SmolLM2-135M-Instruct gets some answers right from the start
  (scripts/measure_default_task.py).
- Generators are registered by name (`BUILTIN_TASKS`), so a user can add a task in code. The visual
  tasks (`count`, `read`: pictures drawn from a seed) live in `mllmjax.data.visual`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable

from mllmjax.errors import BadInputError

BUCKETS = 10
TEST_BUCKETS = 1
SPLIT_SIZES = {"train": 20_000, "test": 1_000}
MAX_LEVEL = 3

_NAMES = (
    "Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade",
    "Kai", "Lena", "Milo", "Nora", "Omar", "Pia", "Ravi", "Sara", "Tom", "Uma",
)  # fmt: skip
_ITEMS = (
    "apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards",
    "books", "coins", "balloons", "crayons", "eggs", "buttons", "beads", "toy cars",
)  # fmt: skip
_CONTAINERS = ("bags", "boxes", "jars", "packs", "baskets", "trays")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Generated:
    """One generated problem: the question, its integer answer and the expression that gives it."""

    question: str
    answer: int
    expression: str


def _add(r: random.Random, hi: int) -> Generated:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    a, b = r.randint(2, hi), r.randint(2, hi)
    friend = r.choice([n for n in _NAMES if n != name])
    templates = (
        f"{name} has {a} {item}. {friend} gives {name} {b} more {item}. How many {item} does {name} have now?",
        f"{name} had {a} {item} and found {b} more. How many {item} does {name} have in total?",
        f"There are {a} {item} in a box and {b} {item} on the table. How many {item} are there altogether?",
    )
    return Generated(question=r.choice(templates), answer=a + b, expression=f"{a} + {b}")


def _sub(r: random.Random, hi: int) -> Generated:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    a = r.randint(3, hi)
    b = r.randint(1, a - 1)
    friend = r.choice([n for n in _NAMES if n != name])
    templates = (
        f"{name} has {a} {item}. {name} gives {b} {item} to {friend}. How many {item} does {name} have left?",
        f"{name} had {a} {item} and lost {b} of them. How many {item} does {name} have now?",
        f"A box holds {a} {item}. {name} takes {b} {item} out. How many {item} are still in the box?",
    )
    return Generated(question=r.choice(templates), answer=a - b, expression=f"{a} - {b}")


def _mul(r: random.Random, hi: int) -> Generated:
    name, item, box = r.choice(_NAMES), r.choice(_ITEMS), r.choice(_CONTAINERS)
    a, b = r.randint(2, min(hi, 9)), r.randint(2, min(hi, 12))
    templates = (
        f"{name} buys {a} {box} of {item}. Each of the {box} has {b} {item}. How many {item} does {name} buy?",
        f"There are {a} {box} with {b} {item} in each. How many {item} are there in all?",
    )
    return Generated(question=r.choice(templates), answer=a * b, expression=f"{a} * {b}")


def _two_step(r: random.Random, hi: int) -> Generated:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    friend = r.choice([n for n in _NAMES if n != name])
    kind = r.randrange(3)
    if kind == 0:
        a, b = r.randint(2, hi), r.randint(2, hi)
        c = r.randint(1, a + b - 1)
        q = (
            f"{name} has {a} {item}, then buys {b} more and gives {c} to {friend}. "
            f"How many {item} does {name} have now?"
        )
        return Generated(question=q, answer=a + b - c, expression=f"{a} + {b} - {c}")
    if kind == 1:
        box = r.choice(_CONTAINERS)
        a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(1, hi)
        q = (
            f"{name} has {a} {box} with {b} {item} in each, and {c} loose {item}. "
            f"How many {item} does {name} have in total?"
        )
        return Generated(question=q, answer=a * b + c, expression=f"{a} * {b} + {c}")
    a, b, c = r.randint(2, hi), r.randint(2, hi), r.randint(2, hi)
    third = r.choice([n for n in _NAMES if n not in (name, friend)])
    q = (
        f"{name} has {a} {item}. {friend} has {b} {item}, and {third} has {c}. "
        f"How many {item} do they have together?"
    )
    return Generated(question=q, answer=a + b + c, expression=f"{a} + {b} + {c}")


def arith(r: random.Random, level: int) -> Generated:
    """Arithmetic word problems; `level` 0 to 3 (see the module docstring)."""
    if level == 0:
        return r.choice((_add, _sub))(r, 9)
    if level == 1:
        return r.choice((_add, _sub))(r, 20)
    if level == 2:
        return r.choice((_add, _sub, _mul))(r, 50)
    return r.choice((_add, _sub, _mul, _two_step, _two_step))(r, 50)


def sums(r: random.Random, level: int) -> Generated:
    """Bare expressions ("What is 17 - 8?"): level 0 adds or subtracts two numbers up to 9, level 1 up
    to 20, level 2 up to 100 with one-digit products too, level 3 chains three numbers up to 50. Results
    are never negative."""
    hi = {0: 9, 1: 20, 2: 100, 3: 50}[level]
    if level == 2 and r.random() < 1 / 3:
        a, b = r.randint(2, 9), r.randint(2, 9)
        return Generated(question=f"What is {a} * {b}?", answer=a * b, expression=f"{a} * {b}")
    a, b = r.randint(2, hi), r.randint(2, hi)
    if level == 3:
        c = r.randint(2, hi)
        if r.random() < 0.5:
            return Generated(
                question=f"What is {a} + {b} + {c}?", answer=a + b + c, expression=f"{a} + {b} + {c}"
            )
        c = r.randint(1, a + b - 1)
        return Generated(
            question=f"What is {a} + {b} - {c}?", answer=a + b - c, expression=f"{a} + {b} - {c}"
        )
    if r.random() < 0.5:
        return Generated(question=f"What is {a} + {b}?", answer=a + b, expression=f"{a} + {b}")
    a, b = max(a, b), min(a, b)
    return Generated(question=f"What is {a} - {b}?", answer=a - b, expression=f"{a} - {b}")


BUILTIN_TASKS: dict[str, Callable[[random.Random, int], Generated]] = {"arith": arith, "sums": sums}
"""Task name -> generator(rng, level). Register more by adding to this dict."""

VISUAL_TASK_NAMES: dict[str, Callable[..., object]] = {}
"""The visual tasks (pictures with their questions), filled by `mllmjax.data.visual`: `count`, `read`."""


def task_names() -> list[str]:
    """Every built-in task's name, text and visual."""
    return sorted({*BUILTIN_TASKS, *VISUAL_TASK_NAMES})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuiltinSpec:
    """A parsed `builtin:TASK[:key=value,...]` spec."""

    task: str
    level: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in BUILTIN_TASKS and self.task not in VISUAL_TASK_NAMES:
            raise BadInputError(f"unknown built-in task {self.task!r}; known: {', '.join(task_names())}")
        if not isinstance(self.level, int) or not 0 <= self.level <= MAX_LEVEL:
            raise BadInputError(f"built-in task level must be an integer 0..{MAX_LEVEL}, got {self.level!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise BadInputError(f"built-in task seed must be a non-negative integer, got {self.seed!r}")

    @property
    def name(self) -> str:
        return f"builtin:{self.task}:level={self.level},seed={self.seed}"


def parse_builtin_spec(spec: str) -> BuiltinSpec:
    """`builtin:arith`, `builtin:arith:level=2` or `builtin:arith:level=2,seed=7`."""
    rest = spec.removeprefix("builtin:")
    task, _, opts = rest.partition(":")
    kwargs: dict[str, int] = {}
    for part in filter(None, opts.split(",")):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in ("level", "seed"):
            raise BadInputError(f"bad option {part!r} in {spec!r}; expected level=N and/or seed=N")
        try:
            kwargs[key] = int(value)
        except ValueError:
            raise BadInputError(f"option {key} in {spec!r} must be an integer, got {value!r}") from None
    return BuiltinSpec(task=task, **kwargs)


def _bucket(question: str) -> int:
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % BUCKETS


def split_of(question: str) -> str:
    """The split a question belongs to, from its text alone; train and test never share a question."""
    return "test" if _bucket(question) < TEST_BUCKETS else "train"


def generate(spec: BuiltinSpec, split: str, index: int) -> Generated:
    """Problem `index` of `split` for `spec`; the same inputs always give the same problem."""
    if split not in SPLIT_SIZES:
        raise BadInputError(f"built-in tasks have splits {', '.join(SPLIT_SIZES)}, got {split!r}")
    key = f"{spec.task}|{spec.level}|{spec.seed}|{split}|{index}".encode()
    r = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
    gen = BUILTIN_TASKS[spec.task]
    # One draw in BUCKETS lands in test, so test needs ~10 draws per problem and train ~1.1; the cap
    # only guards a generator whose questions all hash to one side.
    for _ in range(10_000):
        g = gen(r, spec.level)
        if split_of(g.question) == split:
            return g
    raise BadInputError(f"built-in task {spec.task!r} could not draw a {split} question (index {index})")
