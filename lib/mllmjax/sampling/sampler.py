"""The JAX decoder: batched, group-aware, compiled prefill + decode.

Design decisions:
- One compiled program per shape bucket runs the prefill and every decode step (`lax.while_loop`),
  so no token crosses to the host until the batch is done. The loop stops early once every row has
  finished. Streaming (one prompt) runs the same step function in donated chunks of a few tokens.
- Prompts are right-padded into a [B, P] block with a `valid` mask; positions are 0..len-1 per row,
  padding carries position -1 and is never attended, so a padded row computes exactly what the row
  alone would (the decoder derives its causal mask from positions). Left padding works too (tests
  cover both): each row's next cache slot is the one after its last valid token.
- Group sampling: the B prompts are prefilled once, then the cache and the last-token logits are
  repeated n times along the batch (prompt-major: row = prompt * n + sample), so the n samples of a
  prompt share one prefill.
- Shapes are bucketed: batch rows and generation length (>= 16) to powers of two, prompt length
  (>= 16) to powers of two and the midpoints 3 * 2^k between them (`prompt_bucket`: prefill is a
  large share of a batch's work, and this caps its padding at a third instead of a half), so a run
  over many batches compiles a bounded number of programs; `max_new_tokens` itself is a traced
  value. `compile_count()` counts traces (= compilations) for tests and benchmarks.
- Randomness is per row: the key of (prompt i, sample j) is fold_in(fold_in(seed, i), j), folded
  again with the step, so a seed gives the same completions whatever the batch bucket or the order
  the prompts were packed in.
- A row stops on any stop id (the stop token is kept in the ids and log-probs: the trainer must
  learn to emit it) or when it reaches max_new_tokens, or the model's context; finish_reason is
  "stop" or "length".
- The cache grows while decoding: the whole-run program decodes in up to 4 windows (`decode_windows`),
  each a while loop over a cache only as long as the slots it can fill, then pads the cache to the
  next window. A step reads the whole cache it is given, so in windows it reads about what has been
  written, as HF's growing cache does: at batch 64 on SmolLM2-135M (24-token prompts, 128 new
  tokens) a step went from 186 to 170-173 ms. Growing needs the old and the new window at once,
  which `memory.estimate_sampling` counts.
- On the CPU (`unrolled`), the decode loop unrolls the layers over a per-layer cache and multiplies
  weight-first: each layer matrix is transposed once per program into an output-major copy
  (`decoder.out_major_layer`) and the LM head runs head-first, because XLA:CPU repacks the right-hand
  operand of x [B, D] @ W at every call. At batch 64 on SmolLM2-135M a step went from 160-174 to
  149 ms (b16: 64 to 54 ms), for one more copy of the layer matrices while the program runs.
- The KV cache is the decoder's `KVCache` in the compute dtype. The whole-run program creates it
  inside (nothing to donate); the streaming decode program takes the loop state, cache included, as a
  donated argument so XLA updates the cache buffer in place instead of allocating and copying a new
  cache for every chunk (which would double its memory and cost a full copy per call).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mllmjax.distributed import to_host
from mllmjax.errors import BadInputError
from mllmjax.models import decoder
from mllmjax.models.config import ModelConfig
from mllmjax.sampling.strategies import Greedy, Sample, Strategy

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16
DECODE_WINDOWS = 4  # most windows the cache grows through (see decode_windows)
MIN_WINDOW_STEPS = 32  # fewest decode steps per window

_trace_lock = threading.Lock()
_traces = 0


def compile_count() -> int:
    """How many sampler programs have been traced (each trace is one XLA compilation)."""
    return _traces


def _count_trace() -> None:
    global _traces
    with _trace_lock:
        _traces += 1


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def prompt_bucket(n: int) -> int:
    """The padded prompt length: the smallest 2^k or 3 * 2^(k-1) >= max(n, MIN_PROMPT_BUCKET)."""
    p = bucket(n, MIN_PROMPT_BUCKET)
    return p * 3 // 4 if p * 3 // 4 >= max(n, MIN_PROMPT_BUCKET) else p


def decode_windows(prompt_len: int, out_len: int) -> tuple[int, ...]:
    """The cache lengths a whole run decodes in: the out_len new slots split into at most
    DECODE_WINDOWS windows of at least MIN_WINDOW_STEPS slots each (the last is the full cache)."""
    steps = max(MIN_WINDOW_STEPS, out_len // DECODE_WINDOWS)
    return tuple(prompt_len + min(out_len, steps * (i + 1)) for i in range(-(-out_len // steps)))


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


@struct.dataclass
class DecodeState:
    """The decode loop's carry. Rows are prompt-major: row = prompt * n + sample."""

    cache: decoder.KVCache
    last: jax.Array  # [R] int32, the token sampled last (fed at the next step)
    pos: jax.Array  # [R] int32, the position `last` will take
    rope: tuple[jax.Array, jax.Array]  # decoder.rope_tables of pos, made one step ahead (see there)
    done: jax.Array  # [R] bool
    stopped: jax.Array  # [R] bool, finished on a stop id (else on length)
    limit: jax.Array  # [R] int32, most new tokens this row may produce
    count: jax.Array  # [R] int32, new tokens produced so far
    out_ids: jax.Array  # [R, N] int32
    out_logprobs: jax.Array  # [R, N] float32
    keys: jax.Array  # [R] per-row PRNG keys
    step: jax.Array  # [] int32, tokens sampled so far (= the next column of out_ids)


def _sample_rows(strategy: Strategy, logits: jax.Array, keys: jax.Array, step: jax.Array):
    """Draw one token per row with that row's own key, so rows never share randomness."""
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    tokens, logprobs = jax.vmap(lambda lg, k: strategy.next_tokens(lg[None], k))(logits, step_keys)
    return tokens[:, 0], logprobs[:, 0]


def _record(state: DecodeState, logits: jax.Array, strategy: Strategy, stop_ids: jax.Array) -> DecodeState:
    """Sample from logits [R, V], write the token into the rows that are still running."""
    tokens, logprobs = _sample_rows(strategy, logits, state.keys, state.step)
    live = ~state.done
    col = state.step
    out_ids = state.out_ids.at[:, col].set(jnp.where(live, tokens, 0))
    out_logprobs = state.out_logprobs.at[:, col].set(jnp.where(live, logprobs, 0.0))
    count = state.count + live.astype(jnp.int32)
    is_stop = live & jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)
    done = state.done | is_stop | (count >= state.limit)
    return state.replace(
        last=jnp.where(live, tokens, state.last),
        done=done,
        stopped=state.stopped | is_stop,
        count=count,
        out_ids=out_ids,
        out_logprobs=out_logprobs,
        step=state.step + 1,
    )


def _prefill(
    params: decoder.Params,
    tokens: jax.Array,
    valid: jax.Array,
    limit: jax.Array,
    keys: jax.Array,
    stop_ids: jax.Array,
    *,
    cfg: ModelConfig,
    strategy: Strategy,
    n: int,
    cache_len: int,
    out_len: int,
    compute_dtype: Any,
    unroll: bool,
) -> DecodeState:
    """Prefill B prompts [B, P] once, repeat for n samples each, sample every row's first token."""
    b, p = tokens.shape
    cdt = jnp.dtype(compute_dtype)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    cache = decoder.init_cache(cfg, b, cache_len, cdt, per_layer=unroll)
    hidden, cache = decoder.forward(
        params, cfg, tokens, positions, valid=valid, cache=cache, compute_dtype=cdt
    )
    last_idx = jnp.max(jnp.where(valid, jnp.arange(p)[None, :], -1), axis=1)  # [B]
    # Right or left padding: the next slot is the one after the last valid token.
    cache = cache.replace(index=(last_idx + 1).astype(jnp.int32))
    last_hidden = jnp.take_along_axis(hidden, last_idx[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = decoder.logits_from_hidden(params, last_hidden)  # [B, V]
    lengths = valid.sum(axis=1).astype(jnp.int32)

    def rep(x: jax.Array, axis: int = 0) -> jax.Array:
        return jnp.repeat(x, n, axis=axis) if n > 1 else x

    if unroll:
        cache = cache.replace(k=tuple(rep(x) for x in cache.k), v=tuple(rep(x) for x in cache.v))
    else:
        cache = cache.replace(k=rep(cache.k, 1), v=rep(cache.v, 1))
    cache = cache.replace(pos=rep(cache.pos), index=rep(cache.index))
    rows, pos = b * n, rep(lengths)
    state = DecodeState(
        cache=cache,
        last=jnp.zeros((rows,), jnp.int32),
        pos=pos,
        rope=decoder.rope_tables(pos[:, None], jnp.asarray(cfg.inv_freq())),
        done=rep(limit) <= 0,
        stopped=jnp.zeros((rows,), bool),
        limit=rep(limit),
        count=jnp.zeros((rows,), jnp.int32),
        out_ids=jnp.zeros((rows, out_len), jnp.int32),
        out_logprobs=jnp.zeros((rows, out_len), jnp.float32),
        keys=keys,
        step=jnp.zeros((), jnp.int32),
    )
    return _record(state, rep(logits), strategy, stop_ids)


def _decode(
    params: decoder.Params,
    state: DecodeState,
    until: jax.Array,
    stop_ids: jax.Array,
    *,
    cfg: ModelConfig,
    strategy: Strategy,
    compute_dtype: Any,
) -> DecodeState:
    """Decode until every row is done, `until` tokens have been sampled, or a row's next slot is past
    the end of the cache (the end of a window: see `decode_windows`)."""
    cdt = jnp.dtype(compute_dtype)
    if state.cache.per_layer and not isinstance(params["layers"], tuple):
        params = _slice_layers(params, cfg)
    window = state.cache.length

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < until) & ~jnp.all(s.done) & (jnp.max(s.cache.index) < window)

    def body(s: DecodeState) -> DecodeState:
        hidden, cache = decoder.forward(
            params,
            cfg,
            s.last[:, None],
            s.pos[:, None],
            valid=~s.done[:, None],
            cache=s.cache,
            compute_dtype=cdt,
            rope=s.rope,
        )
        logits = decoder.logits_from_hidden(params, hidden[:, 0], head_first=s.cache.per_layer)
        pos = s.pos + 1
        rope = decoder.rope_tables(pos[:, None], jnp.asarray(cfg.inv_freq()))
        s = s.replace(cache=cache, pos=pos, rope=rope)
        return _record(s, logits, strategy, stop_ids)

    return jax.lax.while_loop(cond, body, state)


def _slice_layers(params: decoder.Params, cfg: ModelConfig) -> decoder.Params:
    """params with the stacked layers as a tuple of per-layer trees, their matrices output-major
    (`decoder.out_major_layer`). A decode loop slices them once, outside the loop: inside it XLA:CPU
    would copy every layer's weights out of the stack at every step. The output-major copy is what
    XLA:CPU multiplies fastest by a decode step's few rows; it costs one more copy of the layer
    matrices while the program runs (`memory.estimate_sampling(out_major=True)`)."""
    layers = decoder.split_layers(params["layers"], cfg.num_layers)
    return {**params, "layers": tuple(decoder.out_major_layer(lp) for lp in layers)}


@functools.cache
def _sliced(cfg: ModelConfig) -> Callable[[decoder.Params], decoder.Params]:
    def sliced(params: decoder.Params) -> decoder.Params:
        _count_trace()
        return _slice_layers(params, cfg)

    return jax.jit(sliced)


@functools.cache
def _programs(
    cfg: ModelConfig,
    strategy: Strategy,
    compute_dtype: str,
    n: int,
    windows: tuple[int, ...],
    out_len: int,
    unroll: bool,
) -> tuple[Callable, Callable, Callable]:
    """(whole run, prefill, decode) jitted for one configuration and shape bucket. The whole run
    grows its cache through `windows`; the streaming pair uses the full cache (windows[-1])."""
    static = dict(cfg=cfg, strategy=strategy, compute_dtype=compute_dtype)
    shapes = dict(n=n, out_len=out_len, unroll=unroll)

    def run(params, tokens, valid, limit, keys, stop_ids):
        _count_trace()
        state = _prefill(
            params, tokens, valid, limit, keys, stop_ids, cache_len=windows[0], **shapes, **static
        )
        if unroll:
            params = _slice_layers(params, cfg)
        for i, window in enumerate(windows):
            if i:
                state = state.replace(cache=decoder.grow_cache(state.cache, window))
            state = _decode(params, state, jnp.int32(out_len), stop_ids, **static)
        return state.out_ids, state.out_logprobs, state.count, state.stopped

    def prefill(params, tokens, valid, limit, keys, stop_ids):
        _count_trace()
        return _prefill(
            params, tokens, valid, limit, keys, stop_ids, cache_len=windows[-1], **shapes, **static
        )

    def decode(params, state, until, stop_ids):
        _count_trace()
        return _decode(params, state, until, stop_ids, **static)

    # The streaming state (KV cache included) is donated: see the module docstring.
    return jax.jit(run), jax.jit(prefill), jax.jit(decode, donate_argnums=(1,))


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
    cfg: ModelConfig, prompts: Sequence[Sequence[int]], rows: int, max_new_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad prompts into [rows, P] with a valid mask; per-row new-token limits (0 for filler)."""
    p = prompt_bucket(max(len(x) for x in prompts))
    tokens = np.zeros((rows, p), np.int32)
    valid = np.zeros((rows, p), bool)
    limit = np.zeros((rows,), np.int32)
    for r, ids in enumerate(prompts):
        tokens[r, : len(ids)] = ids
        valid[r, : len(ids)] = True
        limit[r] = min(max_new_tokens, cfg.max_position_embeddings - len(ids))
    valid[len(prompts) :, 0] = True  # filler rows hold one token so nothing is all-padding
    return tokens, valid, limit


def _validate_run(n: int, max_new_tokens: int, max_batch: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise BadInputError(f"n (samples per prompt) must be a positive integer, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BadInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise BadInputError(f"max_batch must be a positive integer, got {max_batch!r}")


def generate(
    params: decoder.Params,
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
) -> list[Completion]:
    """Sample n completions for every prompt; returns them prompt-major (prompt 0's n samples first).

    strategy: Greedy() or Sample(temperature=, top_k=, top_p=, min_p=) (default Greedy).
    max_batch: most rows (prompts x n) decoded together; prompts are packed by length into batches.
    mesh: run under this mesh (params placed by `mllmjax.sharding`); batches are split over its
        data-parallel axes when they divide evenly.
    unroll_layers: unroll the layer loop with a per-layer cache and output-major layer matrices
        (default: on CPU, where XLA would otherwise copy each layer's weights and cache at every step,
        and multiplies a step's few rows faster weight-first; see decoder.KVCache, decoder.OutMajor).
    first_index: the random stream of prompt i is that of prompt first_index + i (a host decoding
        its share of a larger list passes where its share starts, and samples what one process would).
    on_batch(done_tokens, done_samples): called after each batch, for progress bars.
    """
    strategy = strategy if strategy is not None else Greedy()
    _validate_run(n, max_new_tokens, max_batch)
    if not prompts_ids:
        return []
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
        tokens, valid, limit = _pack(cfg, prompts, rows, max_new_tokens)
        # Filler rows are discarded.
        keys = _row_keys(seed, [first_index + i for i in chunk] + [0] * (rows - len(chunk)), n)
        windows = decode_windows(tokens.shape[1], out_len)
        run, _, _ = _programs(cfg, strategy, cdt.name, n, windows, out_len, unrolled(unroll_layers))
        args = (tokens, valid, limit, keys)
        if mesh is not None:
            args = _place_batch(mesh, args)
        out_ids, out_lp, count, stopped = (to_host(x) for x in run(params, *args, stops))
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


def stream(
    params: decoder.Params,
    cfg: ModelConfig,
    prompt_ids: Sequence[int],
    strategy: Strategy | None = None,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    chunk: int = 8,
    compute_dtype: Any = None,
    unroll_layers: bool | None = None,
) -> Iterator[StreamChunk]:
    """Decode one prompt, yielding its tokens every `chunk` steps (the same tokens `generate` gives
    for prompt 0 with this seed). The loop state is donated between chunks, so the cache stays in
    place on the device; unrolled (CPU), the layers are sliced and transposed once for all chunks."""
    strategy = strategy if strategy is not None else Greedy()
    _validate_run(1, max_new_tokens, 1)
    if chunk < 1:
        raise BadInputError(f"chunk must be a positive integer, got {chunk!r}")
    _check_prompts(cfg, [prompt_ids])
    cdt = jnp.dtype(compute_dtype if compute_dtype is not None else params["embed"].dtype)
    stops = jnp.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], jnp.int32)
    out_len = bucket(max_new_tokens, MIN_NEW_BUCKET)
    tokens, valid, limit = _pack(cfg, [prompt_ids], 1, max_new_tokens)
    windows = (tokens.shape[1] + out_len,)
    unroll = unrolled(unroll_layers)
    _, prefill, decode = _programs(cfg, strategy, cdt.name, 1, windows, out_len, unroll)
    state = prefill(params, tokens, valid, limit, _row_keys(seed, [0], 1), stops)
    if unroll:  # slice (and transpose) the layers once, not in every chunk's call
        params = _sliced(cfg)(params)
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


def _place_batch(mesh: jax.sharding.Mesh, arrays: tuple[Any, ...]) -> tuple[Any, ...]:
    """Split the batch (leading) axis over the mesh's data-parallel axes when it divides evenly."""
    from jax.sharding import NamedSharding, PartitionSpec

    from mllmjax.sharding import batch_axes

    placed = []
    for x in arrays:
        spec = PartitionSpec(batch_axes(mesh, x.shape[0]))
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            # Typed keys go as their raw data: a multi-host device_put takes plain host values only.
            data = jax.device_put(np.asarray(jax.random.key_data(x)), NamedSharding(mesh, spec))
            placed.append(jax.random.wrap_key_data(data, impl=jax.random.key_impl(x)))
        else:
            placed.append(jax.device_put(np.asarray(x), NamedSharding(mesh, spec)))
    return tuple(placed)


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
    "prompt_bucket",
    "stream",
]
