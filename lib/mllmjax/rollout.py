"""Rollouts: G sampled completions per problem, as `mllmjax.rollout/1` records.

The one library function that `mllmjax rollout` calls and the grpo loop will call in process (with the
current parameters, no disk round trip). The sampler prefills each prompt once and shares its cache
across the G samples of its group; the records keep the sampled tokens' log-probs (under
softmax(logits / temperature) over the full vocabulary, the distribution the trainer uses), so the
trainer can use them as old log-probs.

Determinism: problem i of a run is sampled with keys derived from (seed, i), so the same seed gives the
same records whatever the batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from mllmjax.data import Problem
from mllmjax.errors import BadInputError
from mllmjax.models.config import ModelConfig
from mllmjax.models.decoder import Params
from mllmjax.prompts import EXAMPLES, SYSTEM_PROMPT, build_prompt
from mllmjax.records import RolloutRecord
from mllmjax.sampling.sampler import generate
from mllmjax.sampling.strategies import make_strategy


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    group_size: int = 16
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float | None = None
    min_p: float | None = None
    seed: int = 0
    max_batch: int = 64
    system_prompt: str = SYSTEM_PROMPT
    examples: tuple[tuple[str, str], ...] = EXAMPLES

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise BadInputError(f"--group-size must be >= 1, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise BadInputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise BadInputError(f"--temperature must be >= 0, got {self.temperature}")

    def strategy(self) -> Any:
        return make_strategy(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p
        )


def encode_prompt(tokenizer: Any, problem: Problem, cfg: RolloutConfig) -> tuple[str, list[int]]:
    text = build_prompt(tokenizer, problem.question, cfg.system_prompt, cfg.examples)
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_rollouts(
    params: Params,
    model_cfg: ModelConfig,
    tokenizer: Any,
    problems: Sequence[Problem],
    cfg: RolloutConfig,
    *,
    stop_ids: Sequence[int],
    policy: str,
    first_group: int = 0,
    mesh: Any = None,
    compute_dtype: Any = None,
    meta: dict[str, Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[RolloutRecord]:
    """Sample `cfg.group_size` completions for each problem; records come group by group, numbered
    from `first_group`. on_batch(tokens_done, samples_done) reports progress."""
    encoded = [encode_prompt(tokenizer, p, cfg) for p in problems]
    completions = generate(
        params,
        model_cfg,
        [ids for _, ids in encoded],
        cfg.strategy(),
        n=cfg.group_size,
        max_new_tokens=cfg.max_new_tokens,
        stop_ids=stop_ids,
        seed=cfg.seed,
        max_batch=cfg.max_batch,
        compute_dtype=compute_dtype,
        mesh=mesh,
        on_batch=on_batch,
    )
    records = []
    for c in completions:
        problem = problems[c.prompt_index]
        text, ids = encoded[c.prompt_index]
        records.append(
            RolloutRecord(
                prompt_id=problem.id,
                group=first_group + c.prompt_index,
                sample=c.sample_index,
                prompt=text,
                prompt_ids=ids,
                completion=tokenizer.decode(c.ids, skip_special_tokens=True),
                completion_ids=list(c.ids),
                logprobs=list(c.logprobs),
                finish_reason=c.finish_reason,
                answer=problem.answer,
                policy=policy,
                meta=dict(meta or {}),
            )
        )
    return records
