"""Rollouts: G sampled completions per problem, as `mllmjax.rollout/1` records.

The one library function that `mllmjax rollout` calls and the grpo loop will call in process (with the
current parameters, no disk round trip). The sampler prefills each prompt once and shares its cache
across the G samples of its group; the records keep the sampled tokens' log-probs (under
softmax(logits / temperature) over the full vocabulary, the distribution the trainer uses), so the
trainer can use them as old log-probs.

Determinism: problem i of a run is sampled with keys derived from (seed, i), so the same seed gives the
same records whatever the batch size.

Multi-host: `host_rollouts` gives each process its own contiguous share of the problems, decoded on
its own devices (see mllmjax.distributed); problem i keeps its keys (seed, i) on whichever host samples
it, so the records equal a one-process run's. `gather_records` joins the shares in problem order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from mllmjax.data import Problem
from mllmjax.errors import BadInputError
from mllmjax.models.config import ModelConfig
from mllmjax.models.params import Params
from mllmjax.prompts import EXAMPLES, SYSTEM_PROMPT, build_prompt, load_system_prompt
from mllmjax.records import CONTINUATION_KEY, RolloutRecord
from mllmjax.sampling.sampler import generate
from mllmjax.sampling.strategies import Strategy, make_strategy
from mllmjax.settings import DEFAULTS, Settings


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """How rollouts are sampled: `strategy` (Greedy or Sample, validated when made) draws the tokens."""

    strategy: Strategy = dataclasses.field(default_factory=make_strategy)
    group_size: int = DEFAULTS.group_size
    max_new_tokens: int = DEFAULTS.max_new_tokens
    seed: int = DEFAULTS.seed
    max_batch: int = DEFAULTS.batch_size
    system_prompt: str = SYSTEM_PROMPT
    examples: tuple[tuple[str, str], ...] = EXAMPLES

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise BadInputError(f"--group-size must be >= 1, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise BadInputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def from_settings(
        cls, settings: Settings, *, seed: int, group_size: int | None = None, greedy: bool = False
    ) -> RolloutConfig:
        """The rollout settings of `settings` (sampling flags, group size, batch size, system prompt
        file); `group_size` and `greedy` override them, as evaluation does."""
        s = settings
        return cls(
            strategy=make_strategy(
                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, greedy=greedy
            ),
            group_size=group_size or s.group_size,
            max_new_tokens=s.max_new_tokens,
            seed=seed,
            max_batch=s.batch_size,
            system_prompt=load_system_prompt(s.system_prompt),
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
    first_index: int = 0,
    mesh: Any = None,
    compute_dtype: Any = None,
    meta: dict[str, Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[RolloutRecord]:
    """Sample `cfg.group_size` completions for each problem; records come group by group, numbered
    from `first_group`. Problem i is sampled as problem first_index + i of the run (its random stream).
    on_batch(tokens_done, samples_done) reports progress. A problem whose meta holds a continuation
    (`CONTINUATION_KEY`: prefix_ids, from_step; the grpo replay buffer) is prompted with those tokens
    after its prompt, and its records carry the prefix's text in meta[CONTINUATION_KEY]["prefix"]."""
    encoded = [encode_prompt(tokenizer, p, cfg) for p in problems]
    # Continuation prompts (the grpo replay buffer): the prompt followed by a partial completion.
    continued: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(problems):
        replay = p.meta.get(CONTINUATION_KEY)
        if replay is not None:
            prefix = tokenizer.decode(replay["prefix_ids"], skip_special_tokens=True)
            text, ids = encoded[i]
            encoded[i] = (text + prefix, ids + list(replay["prefix_ids"]))
            continued[i] = {"prefix": prefix, "from_step": replay["from_step"]}
    completions = generate(
        params,
        model_cfg,
        [ids for _, ids in encoded],
        cfg.strategy,
        n=cfg.group_size,
        max_new_tokens=cfg.max_new_tokens,
        stop_ids=stop_ids,
        seed=cfg.seed,
        max_batch=cfg.max_batch,
        compute_dtype=compute_dtype,
        mesh=mesh,
        first_index=first_index,
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
                meta={
                    **(meta or {}),
                    **({CONTINUATION_KEY: continued[c.prompt_index]} if c.prompt_index in continued else {}),
                },
            )
        )
    return records


def host_rollouts(
    params: Params,
    model_cfg: ModelConfig,
    tokenizer: Any,
    problems: Sequence[Problem],
    cfg: RolloutConfig,
    *,
    mesh: Any,
    first_group: int = 0,
    **kwargs: Any,
) -> list[RolloutRecord]:
    """This process's share of the rollouts of `problems` (all of them with one process).

    `params` may be laid out for training and `mesh` (`mllmjax.distributed.decode_mesh`) for decoding:
    the parameters are resharded onto it in device memory (nothing moves when the layouts agree), and
    the copy lives only while this call runs. Multi-host: `mesh` is this host's own devices, the copy
    is a whole one on them, and the host decodes its contiguous share of the problems with their
    run-wide random streams and group numbers. Other keyword arguments go to `make_rollouts`."""
    from mllmjax.distributed import host_local_copy, process_share
    from mllmjax.lora import has_adapters
    from mllmjax.sharding import param_shardings

    share = process_share(len(problems))
    if not has_adapters(params):  # LoRA weights come attached only where no copy is needed (grpo)
        params = host_local_copy(params, lambda m: param_shardings(model_cfg, m), mesh)
    return make_rollouts(
        params, model_cfg, tokenizer, problems[share], cfg, mesh=mesh,
        first_group=first_group + share.start, first_index=share.start, **kwargs,
    )  # fmt: skip


def gather_records(records: Sequence[Any]) -> list[Any]:
    """Every process's records joined in process order (= problem order for `host_rollouts` shares);
    the records themselves with one process. A collective: every process must call it."""
    from mllmjax.distributed import allgather_objects

    return [r for part in allgather_objects(list(records)) for r in part]
