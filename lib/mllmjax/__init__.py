"""mllmjax: GRPO reinforcement learning of open LLMs in JAX.

The public API, imported lazily so that `import mllmjax` (and the scoring worker processes that import
its reward functions) do not pay for JAX and transformers until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MllmjaxError": "mllmjax.errors",
    "BadInputError": "mllmjax.errors",
    "ModelConfig": "mllmjax.models.config",
    "Checkpoint": "mllmjax.checkpoint",
    "load_checkpoint": "mllmjax.checkpoint",
    "write_checkpoint": "mllmjax.checkpoint",
    "convert": "mllmjax.convert",
    "export": "mllmjax.convert",
    "make_mesh": "mllmjax.sharding",
    "shard_params": "mllmjax.sharding",
    "RolloutRecord": "mllmjax.records",
    "read_records": "mllmjax.records",
    "write_records": "mllmjax.records",
    "group_records": "mllmjax.records",
    "register_reward": "mllmjax.rewards",
    "register_advantage": "mllmjax.advantages",
    "ScoreConfig": "mllmjax.scoring",
    "score_records": "mllmjax.scoring",
    "generate": "mllmjax.sampling",
    "stream": "mllmjax.sampling",
    "Greedy": "mllmjax.sampling",
    "Sample": "mllmjax.sampling",
    "make_strategy": "mllmjax.sampling",
    "load_problems": "mllmjax.data",
    "build_prompt": "mllmjax.prompts",
    "RolloutConfig": "mllmjax.rollout",
    "make_rollouts": "mllmjax.rollout",
    "Trainer": "mllmjax.trainer",
    "TrainConfig": "mllmjax.trainer",
    "train_checkpoint": "mllmjax.training",
    "summarize": "mllmjax.evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mllmjax' has no attribute {name!r}")
