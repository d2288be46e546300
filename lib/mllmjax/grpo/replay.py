"""The predecessor's two step-level behaviours: the estimator switch and the continuation replay buffer.

Estimator switch (`--estimator-switch entropy<T`): a step looks at the last finished step's policy
entropy (the `entropy` metric, the token mean over its updates); below T the step samples
prompts_per_step x group_size prompts x 1 completion and scores them with `reinforce` (a z-score over
the batch: one sample per prompt has no group to compare with); otherwise it samples prompts_per_step
prompts x group_size with `--advantage`. The metrics rows are the switch's state (the entropy it reads
is the last row's), so `--resume`, which restores the rows with the checkpoint, restores it too.

Replay buffer (`--replay-prob p`, `--replay-size N`): after each step one completion (of two tokens or
more) of each group that was sampled from a fresh prompt is cut at a random token (at least one token
kept on each side) and stored, with its problem, as a partial completion; the buffer keeps the newest
N. While a step draws
its prompts, each one is replaced with probability p by a continuation prompt, taken (and removed) from
a random entry: the entry's prompt followed by its partial completion, so the model samples how to go
on from there. The continuation's rewards are computed on the partial completion plus what was
sampled (the answer may lie in either); only the sampled tokens are trained on. A replaced prompt
consumes no data prompt, so the data order stays the one the run's seed fixes. Every draw comes from a
generator seeded by (seed, step, round), and the buffer is saved in each checkpoint's metadata, so a
resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from mllmjax.errors import BadInputError
from mllmjax.records import CONTINUATION_KEY

SWITCH_ESTIMATOR = "reinforce"
_SWITCH = re.compile(r"^\s*entropy\s*<\s*([^\s]+)\s*$")
# Problem.meta[CONTINUATION_KEY]: {prefix_ids, from_step}, a continuation to sample (`make_rollouts`).


def parse_switch(spec: str | None) -> float | None:
    """The entropy threshold of an `--estimator-switch entropy<T` spec (None: no switch)."""
    if spec is None or spec == "" or spec == "none":
        return None
    match = _SWITCH.match(spec)
    threshold = None
    if match:
        try:
            threshold = float(match.group(1))
        except ValueError:
            threshold = None
    if threshold is None or not math.isfinite(threshold) or threshold <= 0:
        raise BadInputError(
            f"--estimator-switch {spec!r}: expected entropy<T with T a number > 0 (nats per token), "
            "e.g. entropy<0.2"
        )
    return threshold


@dataclasses.dataclass(frozen=True)
class StepMode:
    """How a step samples and scores: `group_size` completions per prompt, `prompts` prompts, the
    advantage estimator, and why (for the metrics row; empty without a switch)."""

    estimator: str
    group_size: int
    prompts: int
    reason: str = ""

    @property
    def switched(self) -> bool:
        return self.group_size == 1


def step_mode(
    threshold: float | None,
    metrics: Sequence[dict[str, Any]],
    *,
    estimator: str,
    group_size: int,
    prompts: int,
) -> StepMode:
    """The mode of the next step, from the switch's threshold and the rows of the steps so far."""
    normal = StepMode(estimator, group_size, prompts)
    if threshold is None:
        return normal
    last = next((row["entropy"] for row in reversed(metrics) if "entropy" in row), None)
    if last is None:
        return dataclasses.replace(normal, reason="no entropy measured yet")
    if last < threshold:
        return StepMode(SWITCH_ESTIMATOR, 1, prompts * group_size, f"entropy {last:.4g} < {threshold:g}")
    return dataclasses.replace(normal, reason=f"entropy {last:.4g} >= {threshold:g}")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A stored partial completion: the problem (its index in the run's data), the completion's first
    tokens, and the step that sampled it."""

    problem: int
    prefix_ids: tuple[int, ...]
    step: int

    def to_json(self) -> dict[str, Any]:
        return {"problem": self.problem, "prefix_ids": list(self.prefix_ids), "step": self.step}


@dataclasses.dataclass(frozen=True)
class ReplayBuffer:
    """The newest `size` partial completions, oldest first. Immutable: a step works on new buffers and
    the run keeps the one of the last finished step (an abandoned step leaves it as it was)."""

    size: int
    entries: tuple[Entry, ...] = ()

    def draw(
        self, count: int, prob: float, rng: np.random.Generator
    ) -> tuple[list[Entry | None], ReplayBuffer]:
        """For each of `count` prompt slots, an entry (removed from the buffer) with probability
        `prob` while any is left, else None (a fresh data prompt)."""
        entries = list(self.entries)
        slots: list[Entry | None] = []
        for _ in range(count):
            replace = rng.random() < prob
            if replace and entries:
                slots.append(entries.pop(int(rng.integers(len(entries)))))
            else:
                slots.append(None)
        return slots, dataclasses.replace(self, entries=tuple(entries))

    def add(
        self, candidates: Sequence[tuple[int, Sequence[int]]], step: int, rng: np.random.Generator
    ) -> ReplayBuffer:
        """The buffer with one partial completion of each (problem index, completion ids) candidate of
        at least two tokens, cut after a uniform 1..n-1 of its n tokens; the newest `size` kept."""
        new = []
        for problem, ids in candidates:
            if len(ids) < 2:
                continue
            cut = int(rng.integers(1, len(ids)))
            new.append(Entry(int(problem), tuple(int(i) for i in ids[:cut]), step))
        return dataclasses.replace(self, entries=(*self.entries, *new)[-self.size :])

    def to_json(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.entries]

    @classmethod
    def from_json(cls, size: int, data: Sequence[dict[str, Any]] | None) -> ReplayBuffer:
        entries = tuple(
            Entry(int(d["problem"]), tuple(int(i) for i in d["prefix_ids"]), int(d["step"]))
            for d in data or ()
        )
        return cls(size, entries[-size:])


def step_candidates(
    records: Sequence[Any], fresh: dict[int, int], rng: np.random.Generator, avoid: Collection[int] = ()
) -> list[tuple[int, list[int]]]:
    """One completion of two tokens or more, chosen uniformly, of each group of the step's records that
    was sampled from a fresh data prompt: (problem index, completion ids). `fresh` maps those groups to
    their problems. avoid: token ids a completion must not hold to be continued (a vision-language
    model's image tokens: a prompt holds exactly those its images fill)."""
    avoid = frozenset(avoid)
    groups: dict[int, list[Any]] = {}
    for r in records:  # a cut must leave a token on each side
        if r.group in fresh and len(r.completion_ids) >= 2 and avoid.isdisjoint(r.completion_ids):
            groups.setdefault(r.group, []).append(r)
    out = []
    for group in sorted(groups):
        members = sorted(groups[group], key=lambda r: r.sample)
        pick = members[int(rng.integers(len(members)))]
        out.append((fresh[group], list(pick.completion_ids)))
    return out


def continuation(problem: Any, entry: Entry) -> Any:
    """The Problem of a continuation prompt: `problem` (its images too) with the entry's partial
    completion to go on from (`make_rollouts` appends it to the encoded prompt)."""
    meta = {**problem.meta, CONTINUATION_KEY: {"prefix_ids": list(entry.prefix_ids), "from_step": entry.step}}
    return dataclasses.replace(problem, meta=meta)
