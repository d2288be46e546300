"""Rollouts: G sampled completions per problem, as `mllmjax.rollout/1` records.

The one library function that `mllmjax rollout` calls and the grpo loop will call in process (with the
current parameters, no disk round trip). The sampler prefills each prompt once and shares its cache
across the G samples of its group; the records keep the sampled tokens' log-probs (under
softmax(logits / temperature) over the full vocabulary, the distribution the trainer uses), so the
trainer can use them as old log-probs.

Determinism: problem i of a run is sampled with keys derived from (seed, i), so the same seed gives the
same records whatever the batch size.

Vision-language checkpoints (LLaVA, Gemma 3 with vision): `make_vision_rollouts` builds each prompt with the checkpoint's own
HF processor (`mllmjax.images`: chat template image slots, image token expansion, pixel preprocessing),
runs the vision tower once per prompt, and decodes the G samples of a prompt from its one prefill
(`sampling.generate_embeds`); records of prompts with images carry them (schema mllmjax.rollout/2:
each image's path and SHA-256).

Multi-host: `host_rollouts` (`host_vision_rollouts` on a vision-language checkpoint) gives each process
its own contiguous share of the problems, decoded on its own devices (see mllmjax.distributed); problem
i keeps its keys (seed, i) on whichever host samples it, so the records equal a one-process run's.
`gather_records` joins the shares in problem order.
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
    with_images = next((p for p in problems if p.images), None)
    if with_images is not None:
        raise BadInputError(
            f"problem {with_images.id} has images; a text model cannot read them (a vision-language "
            "checkpoint can: `make_vision_rollouts`)"
        )
    encoded = [encode_prompt(tokenizer, p, cfg) for p in problems]
    continued = _continue(problems, encoded, tokenizer)
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
        i = c.prompt_index
        extra = {CONTINUATION_KEY: continued[i]} if i in continued else {}
        records.append(_record(c, problems[i], *encoded[i], first_group, tokenizer, policy, {**(meta or {}), **extra}))
    return records


def _continue(problems: Sequence[Problem], encoded: list[Any], tokenizer: Any) -> dict[int, dict[str, Any]]:
    """Continuation prompts (the grpo replay buffer): each encoded (text, ids, ...) of a problem with a
    continuation gets its partial completion appended, in place; returns {index: what its records'
    meta[CONTINUATION_KEY] holds (the prefix's text and the step it came from)}."""
    continued: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(problems):
        replay = p.meta.get(CONTINUATION_KEY)
        if replay is not None:
            prefix = tokenizer.decode(replay["prefix_ids"], skip_special_tokens=True)
            text, ids, *rest = encoded[i]
            encoded[i] = (text + prefix, ids + list(replay["prefix_ids"]), *rest)
            continued[i] = {"prefix": prefix, "from_step": replay["from_step"]}
    return continued


def _record(
    c: Any,
    problem: Problem,
    prompt: str,
    prompt_ids: list[int],
    first_group: int,
    tokenizer: Any,
    policy: str,
    meta: dict[str, Any],
    images: list[dict[str, str]] | None = None,
) -> RolloutRecord:
    """The rollout record of completion c (a `sampling.Completion`) of `problem`, prompted with
    prompt / prompt_ids; images: its images' {path, sha256} (schema /2), None for a text prompt."""
    return RolloutRecord(
        prompt_id=problem.id,
        group=first_group + c.prompt_index,
        sample=c.sample_index,
        prompt=prompt,
        prompt_ids=prompt_ids,
        completion=tokenizer.decode(c.ids, skip_special_tokens=True),
        completion_ids=list(c.ids),
        logprobs=list(c.logprobs),
        finish_reason=c.finish_reason,
        answer=problem.answer,
        policy=policy,
        meta=meta,
        images=images,
    )


def vision_messages(question: Any, cfg: RolloutConfig) -> list[dict[str, Any]]:
    """The chat of a vision prompt: the system turn, the worked examples and the user's question (its
    content a list of items, image items first), every content in the list form processors' chat
    templates take."""

    def text(t: str) -> list[dict[str, str]]:
        return [{"type": "text", "text": t}]

    messages = [{"role": "system", "content": text(cfg.system_prompt)}] if cfg.system_prompt else []
    for q, r in cfg.examples:
        messages += [{"role": "user", "content": text(q)}, {"role": "assistant", "content": text(r)}]
    content = question if isinstance(question, list) else text(question)
    return messages + [{"role": "user", "content": content}]


def encode_vision_prompt(
    processor: Any, problem: Problem, cfg: RolloutConfig, pictures: Sequence[Any]
) -> tuple[str, list[int], Any]:
    """(prompt text, token ids with the image tokens expanded, pixels [N, C, H, W] or None) of a problem
    with images, made by the processor as `sample --image` makes its prompts: the question's image
    tokens are its slots, else one slot per image goes before it."""
    from mllmjax import images as im

    text, use_chat = vision_prompt_text(processor, problem, cfg, len(pictures))
    ids, pixels = im.processor_inputs(processor, text, pictures, chat=use_chat, where=f"problem {problem.id}")
    return text, ids, pixels


def vision_prompt_text(processor: Any, problem: Problem, cfg: RolloutConfig, num_images: int) -> tuple[str, bool]:
    """(the prompt text of a problem with num_images images, before the processor expands its image
    tokens; whether it went through the chat template), as `encode_vision_prompt` makes it."""
    from mllmjax import images as im

    extra = im.image_slots(processor, problem.question, num_images, where=f"problem {problem.id}")
    use_chat = bool(getattr(processor, "chat_template", None))
    if use_chat:
        question = im.user_content(problem.question, extra)
        text = processor.apply_chat_template(vision_messages(question, cfg), add_generation_prompt=True, tokenize=False)
        return text, True
    question = im.plain_text(processor, problem.question, extra)
    return build_prompt(None, question, cfg.system_prompt, cfg.examples), False


def vision_prompt_length(processor: Any, problem: Problem, cfg: RolloutConfig, tokens_per_image: int) -> int:
    """How many tokens `encode_vision_prompt` gives `problem`, without reading its pictures: its text's
    tokens with each image token expanded to tokens_per_image (the memory estimate's prompt length)."""
    from mllmjax import images as im

    text, use_chat = vision_prompt_text(processor, problem, cfg, len(problem.images))
    text = im.expanded_text(processor, text, tokens_per_image)
    return len(processor.tokenizer(text, add_special_tokens=not use_chat)["input_ids"])


def make_vision_rollouts(
    params: Params,
    model_cfg: Any,
    processor: Any,
    problems: Sequence[Problem],
    cfg: RolloutConfig,
    *,
    stop_ids: Sequence[int],
    policy: str,
    first_group: int = 0,
    first_index: int = 0,
    mesh: Any = None,
    meta: dict[str, Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    compute_dtype: Any = None,
) -> list[RolloutRecord]:
    """`make_rollouts` on a vision-language checkpoint: params {"vision", "projector", "text"},
    model_cfg its config (`mllmjax.models.vision`), processor its HF processor, compute_dtype the
    tower's, projector's and decoder's (default the params'). Every image is read (and hashed) before any
    device work; each prompt's input embeddings (text embeddings with its image features in place) are
    made once, and its G samples share its prefill. A problem without images is a text prompt of the
    same model, written as a /1 record. A continuation (the grpo replay buffer) is prompted as
    `make_rollouts` prompts one: its partial completion after the prompt with its images."""
    from mllmjax import images as im
    from mllmjax.models.vision import vlm
    from mllmjax.sampling.sampler import generate_embeds

    paths = list(dict.fromkeys(path for p in problems for path in p.images))
    opened = {path: im.open_image(path) for path in paths}
    digests = {path: im.file_sha256(path) for path in paths}
    encoded = [encode_vision_prompt(processor, p, cfg, [opened[x] for x in p.images]) for p in problems]
    continued = _continue(problems, encoded, processor.tokenizer)
    context = model_cfg.text.max_position_embeddings
    for p, (_, ids, _) in zip(problems, encoded, strict=True):
        if len(ids) >= context:
            raise BadInputError(
                f"problem {p.id}: its prompt is {len(ids)} tokens (with its images); the model's context "
                f"is {context}"
            )
    embeds = [vlm.prompt_embeds(params, model_cfg, ids, pixels, compute_dtype) for _, ids, pixels in encoded]
    completions = generate_embeds(
        params["text"],
        model_cfg.text,
        embeds,
        cfg.strategy,
        n=cfg.group_size,
        max_new_tokens=cfg.max_new_tokens,
        stop_ids=stop_ids,
        seed=cfg.seed,
        max_batch=cfg.max_batch,
        mesh=mesh,
        first_index=first_index,
        on_batch=on_batch,
        reach=[vlm.prompt_reach(model_cfg, ids) for _, ids, _ in encoded],
        compute_dtype=compute_dtype,
    )
    records = []
    for c in completions:
        problem = problems[c.prompt_index]
        text, ids, _ = encoded[c.prompt_index]
        images = [{"path": x, "sha256": digests[x]} for x in problem.images] or None
        extra = {CONTINUATION_KEY: continued[c.prompt_index]} if c.prompt_index in continued else {}
        records.append(
            _record(c, problem, text, ids, first_group, processor.tokenizer, policy, {**(meta or {}), **extra}, images)
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
    params, share = _host_share(params, model_cfg, problems, mesh)
    return make_rollouts(
        params, model_cfg, tokenizer, problems[share], cfg, mesh=mesh,
        first_group=first_group + share.start, first_index=share.start, **kwargs,
    )  # fmt: skip


def host_vision_rollouts(
    params: Params,
    model_cfg: Any,
    processor: Any,
    problems: Sequence[Problem],
    cfg: RolloutConfig,
    *,
    mesh: Any,
    first_group: int = 0,
    **kwargs: Any,
) -> list[RolloutRecord]:
    """`host_rollouts` on a vision-language checkpoint: this process's share of the problems through
    `make_vision_rollouts` (other keyword arguments go there), the whole model (tower, projector,
    language model) copied onto this host's decode `mesh`. Every process reads its share's images; a
    multi-host run keeps them on storage every host sees (as its checkpoints)."""
    params, share = _host_share(params, model_cfg, problems, mesh)
    return make_vision_rollouts(
        params, model_cfg, processor, problems[share], cfg, mesh=mesh if mesh.devices.size > 1 else None,
        first_group=first_group + share.start, first_index=share.start, **kwargs,
    )  # fmt: skip


def _host_share(
    params: Params, model_cfg: Any, problems: Sequence[Problem], mesh: Any
) -> tuple[Params, slice]:
    """(params on the decode `mesh`, this process's slice of `problems`): `host_rollouts`'s."""
    from mllmjax.distributed import host_local_copy, process_share
    from mllmjax.lora import has_adapters
    from mllmjax.sharding import param_shardings

    if not has_adapters(params):  # LoRA weights come attached only where no copy is needed (grpo)
        params = host_local_copy(params, lambda m: param_shardings(model_cfg, m), mesh)
    return params, process_share(len(problems))


def gather_records(records: Sequence[Any]) -> list[Any]:
    """Every process's records joined in process order (= problem order for `host_rollouts` shares);
    the records themselves with one process. A collective: every process must call it."""
    from mllmjax.distributed import allgather_objects

    return [r for part in allgather_objects(list(records)) for r in part]
