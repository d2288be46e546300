"""Sampling from a model: `generate` (batched, group-aware) and `stream` (one prompt, chunk by chunk).

- Prompts are right-padded into a [B, P] block with a `valid` mask; positions are 0..len-1 per row,
  padding carries position -1 and is never attended, so a padded row computes exactly what the row
  alone would. Left padding works too: each row's next cache slot is the one after its last valid token.
- Prompts are packed by length into batches of shape buckets (`buckets`), so a run compiles a bounded
  number of programs (`programs`).
- A prefix that a batch's prompts share (a system prompt and worked examples: 279 of ~310 tokens in
  the built-in tasks' prompts) is prefilled once for the batch, not once per prompt (`shared_prefix`).
- The key of (prompt i, sample j) is fold_in(fold_in(seed, i), j), so a seed gives the same
  completions whatever the batch bucket or the order the prompts were packed in.
- finish_reason is "stop" (a stop id) or "length" (max_new_tokens, or the model's context).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllmjax.distributed import to_host
from mllmjax.errors import BadInputError
from mllmjax.faults import signal_point
from mllmjax.models.config import ModelConfig
from mllmjax.models.params import Params
from mllmjax.sampling.buckets import MIN_NEW_BUCKET, bucket, decode_windows, floor_bucket, prompt_bucket
from mllmjax.sampling.programs import (
    DecodeState,
    compile_count,
    compiled,
    compiled_embeds,
    per_layer_cache,
    sliced_layers,
)
from mllmjax.sampling.strategies import Greedy, Sample, Strategy
from mllmjax.sharding import place_rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class Completion:
    """One sampled continuation: the new token ids, their log-probs, and why it stopped."""

    prompt_index: int
    sample_index: int
    ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamChunk:
    """Tokens decoded since the previous chunk; finish_reason is set on the last chunk only."""

    ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


def _row_keys(seed: int, prompt_indices: Sequence[int], n: int) -> jax.Array:
    base = jax.random.key(seed)
    keys = [jax.random.fold_in(jax.random.fold_in(base, i), j) for i in prompt_indices for j in range(n)]
    return jnp.stack(keys)


def _check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]]) -> None:
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise BadInputError(f"prompt {i} is empty; every prompt needs at least one token")
        if len(ids) >= cfg.max_position_embeddings:
            raise BadInputError(
                f"prompt {i} has {len(ids)} tokens; the model's context is {cfg.max_position_embeddings} "
                "tokens and at least one must be left to generate; shorten the prompt"
            )
        bad = [t for t in ids if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise BadInputError(
                f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})"
            )


def _pack(
    cfg: ModelConfig, prompts: Sequence[Sequence[int]], rows: int, max_new_tokens: int, skip: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad prompts, less their first `skip` tokens (a shared prefix), into [rows, P] with a
    valid mask; per-row new-token limits (0 for filler)."""
    p = prompt_bucket(max(len(x) for x in prompts) - skip)
    tokens = np.zeros((rows, p), np.int32)
    valid = np.zeros((rows, p), bool)
    limit = np.zeros((rows,), np.int32)
    for r, ids in enumerate(prompts):
        tokens[r, : len(ids) - skip] = ids[skip:]
        valid[r, : len(ids) - skip] = True
        limit[r] = min(max_new_tokens, cfg.max_position_embeddings - len(ids))
    valid[len(prompts) :, 0] = True  # filler rows hold one token so nothing is all-padding
    return tokens, valid, limit


MIN_SHARED_PREFIX = 64  # shortest prefix the sampler prefills once for a batch (see shared_prefix)


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens of a batch's prompts to prefill once for all of them: their common
    prefix, cut down to a prompt bucket (so a run compiles few programs) and to leave every prompt at
    least one token of its own; 0 when that is under MIN_SHARED_PREFIX tokens or when it would not
    prefill fewer tokens than the plain batch does."""
    if len(prompts) < 2:
        return 0
    first, shortest = prompts[0], min(len(x) for x in prompts)
    common = 0
    while common < shortest - 1 and all(x[common] == first[common] for x in prompts):
        common += 1
    if common < MIN_SHARED_PREFIX:
        return 0
    skip = floor_bucket(common)
    longest = max(len(x) for x in prompts)
    plain = len(prompts) * prompt_bucket(longest)
    return skip if skip + len(prompts) * prompt_bucket(longest - skip) < plain else 0


def _validate_run(n: int, max_new_tokens: int, max_batch: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise BadInputError(f"n (samples per prompt) must be a positive integer, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BadInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise BadInputError(f"max_batch must be a positive integer, got {max_batch!r}")


def generate(
    params: Params,
    cfg: ModelConfig,
    prompts_ids: Sequence[Sequence[int]],
    strategy: Strategy | None = None,
    *,
    n: int = 1,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    max_batch: int = 64,
    compute_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    unroll_layers: bool | None = None,
    first_index: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
    share_prefix: bool = True,
) -> list[Completion]:
    """Sample n completions for every prompt; returns them prompt-major (prompt 0's n samples first).

    strategy: Greedy() or Sample(temperature=, top_k=, top_p=, min_p=) (default Greedy).
    max_batch: most rows (prompts x n) decoded together; prompts are packed by length into batches.
    mesh: run under this mesh (params placed by `mllmjax.sharding`); batches are split over its
        data-parallel axes when they divide evenly.
    unroll_layers: unroll the layer loop with a per-layer cache and output-major layer matrices
        (default: on CPU, where XLA would otherwise copy each layer's weights and cache at every step,
        and multiplies a step's few rows faster weight-first; see `mllmjax.models.blocks.cpu`). A model
        with sliding-window layers decodes over a per-layer cache (ring buffers of the window in
        those layers) either way; see `mllmjax.sampling.programs`.
    first_index: the random stream of prompt i is that of prompt first_index + i (a host decoding
        its share of a larger list passes where its share starts, and samples what one process would).
    on_batch(done_tokens, done_samples): called after each batch, for progress bars.
    share_prefix: prefill the prefix that a batch's prompts share (a system prompt, worked examples)
        once for the batch instead of once per prompt (`shared_prefix` says when it is worth it).
    """
    strategy = strategy if strategy is not None else Greedy()
    _validate_run(n, max_new_tokens, max_batch)
    if not prompts_ids:
        return []
    signal_point("sampling")
    _check_prompts(cfg, prompts_ids)
    cdt = jnp.dtype(compute_dtype if compute_dtype is not None else params["embed"].dtype)
    per_batch = max(1, max_batch // n)
    order = sorted(range(len(prompts_ids)), key=lambda i: -len(prompts_ids[i]))
    stops = jnp.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], jnp.int32)
    out_len = bucket(max_new_tokens, MIN_NEW_BUCKET)
    results: dict[int, list[Completion]] = {}
    tokens_done = 0
    for start in range(0, len(order), per_batch):
        chunk = order[start : start + per_batch]
        rows = bucket(len(chunk))
        prompts = [prompts_ids[i] for i in chunk]
        skip = shared_prefix(prompts) if share_prefix else 0
        tokens, valid, limit = _pack(cfg, prompts, rows, max_new_tokens, skip)
        # Filler rows are discarded.
        keys = _row_keys(seed, [first_index + i for i in chunk] + [0] * (rows - len(chunk)), n)
        windows = decode_windows(skip + tokens.shape[1], out_len)
        run, _, _ = compiled(cfg, strategy, cdt.name, n, windows, out_len, unrolled(unroll_layers))
        args = (tokens, valid, limit, keys)
        if mesh is not None:
            args = place_rows(args, mesh)
        prefix = np.asarray(prompts[0][:skip], np.int32)[None, :] if skip else None
        if prefix is not None and mesh is not None:
            prefix = place_rows(prefix, mesh)  # one row: whole on every device
        out_ids, out_lp, count, stopped = (to_host(x) for x in run(params, *args, stops, prefix))
        for c, i in enumerate(chunk):
            results[i] = []
            for j in range(n):
                r = c * n + j
                k = int(count[r])
                results[i].append(
                    Completion(
                        prompt_index=i,
                        sample_index=j,
                        ids=out_ids[r, :k].tolist(),
                        logprobs=out_lp[r, :k].tolist(),
                        finish_reason="stop" if stopped[r] else "length",
                    )
                )
                tokens_done += k
        if on_batch is not None:
            on_batch(tokens_done, len(results) * n)
    return [c for i in range(len(prompts_ids)) for c in results[i]]


def _check_embeds(cfg: ModelConfig, prompts: Sequence[jax.Array]) -> None:
    for i, x in enumerate(prompts):
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != cfg.hidden_size:
            raise BadInputError(
                f"prompt {i}: input embeddings of shape {tuple(x.shape)}, expected [tokens, {cfg.hidden_size}]"
            )
        if x.shape[0] >= cfg.max_position_embeddings:
            raise BadInputError(
                f"prompt {i} has {x.shape[0]} tokens; the model's context is {cfg.max_position_embeddings} "
                "tokens and at least one must be left to generate; shorten the prompt"
            )


def _pack_embeds(
    cfg: ModelConfig,
    prompts: Sequence[jax.Array],
    rows: int,
    max_new_tokens: int,
    dtype: Any,
    reach: Sequence[Any] | None = None,
) -> tuple[jax.Array, np.ndarray, np.ndarray, np.ndarray | None]:
    """`_pack` for prompts given as input embeddings [T_i, D]: right-padded with zeros into [rows, P, D]
    (on the device they are on), with the valid mask, per-row new-token limits and each token's reach
    [rows, P] (its own index, or what `reach` gives: per prompt an int array [T_i] or None); None when
    no prompt reaches ahead, so a causal prefill keeps the plain mask."""
    lengths = [int(x.shape[0]) for x in prompts]
    p = prompt_bucket(max(lengths))
    padded = [
        jnp.pad(x.astype(dtype), ((0, p - len_), (0, 0))) for x, len_ in zip(prompts, lengths, strict=True)
    ]
    padded += [jnp.zeros((p, cfg.hidden_size), dtype)] * (rows - len(prompts))
    valid = np.zeros((rows, p), bool)
    limit = np.zeros((rows,), np.int32)
    for r, length in enumerate(lengths):
        valid[r, :length] = True
        limit[r] = min(max_new_tokens, cfg.max_position_embeddings - length)
    valid[len(prompts) :, 0] = True  # filler rows hold one token so nothing is all-padding
    if reach is None or all(row is None for row in reach):
        return jnp.stack(padded), valid, limit, None
    reaches = np.broadcast_to(np.arange(p, dtype=np.int32), (rows, p)).copy()
    for r, row in enumerate(reach):
        if row is not None:
            reaches[r, : lengths[r]] = np.asarray(row, np.int32)
    return jnp.stack(padded), valid, limit, reaches


def generate_embeds(
    params: Params,
    cfg: ModelConfig,
    prompts: Sequence[jax.Array],
    strategy: Strategy | None = None,
    *,
    n: int = 1,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    max_batch: int = 64,
    compute_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    unroll_layers: bool | None = None,
    first_index: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
    reach: Sequence[Any] | None = None,
) -> list[Completion]:
    """`generate` for prompts given as input embeddings [T_i, D] (the first layer's input: a
    vision-language model's text embeddings with its image features in place), decoded with the text
    model's params and config. Each prompt is prefilled once and its cache repeated for its n samples;
    then decoding is the text sampler's. Same keys, ordering and finish reasons as `generate` (no
    shared-prefix prefill: prompts with images rarely share one). reach: per prompt None or an int
    array [T_i], the index up to which each of its tokens sees in the prefill (Gemma 3's image tokens
    see their whole image: `mllmjax.models.vision.vlm.prompt_reach`); None: causal."""
    strategy = strategy if strategy is not None else Greedy()
    _validate_run(n, max_new_tokens, max_batch)
    if not prompts:
        return []
    signal_point("sampling")
    _check_embeds(cfg, prompts)
    cdt = jnp.dtype(compute_dtype if compute_dtype is not None else params["embed"].dtype)
    per_batch = max(1, max_batch // n)
    order = sorted(range(len(prompts)), key=lambda i: -int(prompts[i].shape[0]))
    stops = jnp.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], jnp.int32)
    out_len = bucket(max_new_tokens, MIN_NEW_BUCKET)
    results: dict[int, list[Completion]] = {}
    tokens_done = 0
    for start in range(0, len(order), per_batch):
        chunk = order[start : start + per_batch]
        rows = bucket(len(chunk))
        chunk_reach = None if reach is None else [reach[i] for i in chunk]
        embeds, valid, limit, reaches = _pack_embeds(
            cfg, [prompts[i] for i in chunk], rows, max_new_tokens, cdt, chunk_reach
        )
        keys = _row_keys(seed, [first_index + i for i in chunk] + [0] * (rows - len(chunk)), n)
        windows = decode_windows(embeds.shape[1], out_len)
        run, _ = compiled_embeds(cfg, strategy, cdt.name, n, windows, out_len, unrolled(unroll_layers))
        args = (embeds, valid, limit, keys)
        if mesh is not None:
            args = place_rows(args, mesh)
            reaches = None if reaches is None else place_rows((reaches,), mesh)[0]
        out_ids, out_lp, count, stopped = (to_host(x) for x in run(params, *args, stops, reaches))
        for c, i in enumerate(chunk):
            results[i] = []
            for j in range(n):
                r = c * n + j
                k = int(count[r])
                results[i].append(
                    Completion(
                        prompt_index=i,
                        sample_index=j,
                        ids=out_ids[r, :k].tolist(),
                        logprobs=out_lp[r, :k].tolist(),
                        finish_reason="stop" if stopped[r] else "length",
                    )
                )
                tokens_done += k
        if on_batch is not None:
            on_batch(tokens_done, len(results) * n)
    return [c for i in range(len(prompts)) for c in results[i]]


def stream(
    params: Params,
    cfg: ModelConfig,
    prompt_ids: Sequence[int] | None,
    strategy: Strategy | None = None,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    chunk: int = 8,
    compute_dtype: Any = None,
    unroll_layers: bool | None = None,
    embeds: jax.Array | None = None,
    reach: Any = None,
) -> Iterator[StreamChunk]:
    """Decode one prompt, yielding its tokens every `chunk` steps (the same tokens `generate` gives
    for prompt 0 with this seed). The loop state is donated between chunks, so the cache stays in
    place on the device; unrolled (CPU), the layers are sliced and transposed once for all chunks.
    embeds [T, D]: the prompt as input embeddings (`generate_embeds`); prompt_ids is then None; reach
    [T]: its tokens' reach, as `generate_embeds` takes it."""
    strategy = strategy if strategy is not None else Greedy()
    _validate_run(1, max_new_tokens, 1)
    if chunk < 1:
        raise BadInputError(f"chunk must be a positive integer, got {chunk!r}")
    cdt = jnp.dtype(compute_dtype if compute_dtype is not None else params["embed"].dtype)
    stops = jnp.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], jnp.int32)
    out_len = bucket(max_new_tokens, MIN_NEW_BUCKET)
    unroll = unrolled(unroll_layers)
    keys = _row_keys(seed, [0], 1)
    if embeds is None:
        _check_prompts(cfg, [prompt_ids])
        tokens, valid, limit = _pack(cfg, [prompt_ids], 1, max_new_tokens)
        windows = (tokens.shape[1] + out_len,)
        _, prefill, decode = compiled(cfg, strategy, cdt.name, 1, windows, out_len, unroll)
        state = prefill(params, tokens, valid, limit, keys, stops)
    else:
        _check_embeds(cfg, [embeds])
        packed, valid, limit, reaches = _pack_embeds(cfg, [embeds], 1, max_new_tokens, cdt, [reach])
        windows = (packed.shape[1] + out_len,)
        _, prefill = compiled_embeds(cfg, strategy, cdt.name, 1, windows, out_len, unroll)
        _, _, decode = compiled(cfg, strategy, cdt.name, 1, windows, out_len, unroll)
        state = prefill(params, packed, valid, limit, keys, stops, reaches)
    if per_layer_cache(cfg, unroll):  # slice (and, on CPU, transpose) the layers once, not every chunk
        params = sliced_layers(cfg, unroll)(params)
    sent = 0
    while True:
        count, done = (int(x) for x in jax.device_get((state.count[0], state.done[0])))
        if count > sent or done:
            ids, lps = jax.device_get((state.out_ids[0, sent:count], state.out_logprobs[0, sent:count]))
            finish = ("stop" if bool(state.stopped[0]) else "length") if done else None
            yield StreamChunk(ids=ids.tolist(), logprobs=lps.tolist(), finish_reason=finish)
            sent = count
        if done:
            return
        state = decode(params, state, jnp.int32(count + chunk), stops)


def unrolled(unroll_layers: bool | None = None) -> bool:
    """Whether a run unrolls the layer loop with a per-layer cache and output-major layer matrices
    (`unroll_layers`, default: on the CPU backend)."""
    return jax.default_backend() == "cpu" if unroll_layers is None else bool(unroll_layers)


__all__ = [
    "Completion",
    "DecodeState",
    "Greedy",
    "Sample",
    "StreamChunk",
    "bucket",
    "compile_count",
    "decode_windows",
    "generate",
    "generate_embeds",
    "prompt_bucket",
    "stream",
]
