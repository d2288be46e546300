"""Custom rewards for the grpo tests (loaded as `grpo_rewards:NAME` through --reward-fn)."""

from __future__ import annotations

import os
from pathlib import Path


def even(completion: str, answer: str, record: dict) -> float:
    """The fraction of even token ids: varies within a group of a random tiny model, so GRPO has signal.

    With MLLMJAX_TEST_REWARD_LOG=DIR set, each scoring process appends the group it scored to
    DIR/<pid>.txt, as probeN for the groups of grpo's probe (the multi-host test checks that every host
    scores its own share only)."""
    log = os.environ.get("MLLMJAX_TEST_REWARD_LOG")
    if log:
        with open(Path(log) / f"{os.getpid()}.txt", "a") as f:
            f.write(f"{'probe' if record['meta'].get('probe') else ''}{record['group']}\n")
    ids = record["completion_ids"]
    return sum(i % 2 == 0 for i in ids) / max(len(ids), 1)


def even_groups_only(completion: str, answer: str, record: dict) -> float:
    """Signal only in even-numbered groups: odd groups have zero reward variance (dynamic sampling)."""
    return float(record["group"] % 2 == 0 and record["sample"] % 2 == 0)


def starts_5_mod_8(completion: str, answer: str, record: dict) -> float:
    """1 when the completion's first token id is 5 mod 8 (one id in eight, none of them special), else 0:
    a task that a tiny random model learns in a few GRPO steps (the reward-rises test)."""
    ids = record["completion_ids"]
    return float(bool(ids) and ids[0] % 8 == 5)
