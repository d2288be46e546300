"""The sampler's compiled programs: prefill and the decode loop, one jitted set per shape bucket.

- One program runs the prefill and every decode step (`lax.while_loop`), so no token crosses to the
  host until the batch is done; the loop stops early once every row has finished. Streaming runs the
  same step function in donated chunks of a few tokens.
- Group sampling: the B prompts are prefilled once, then the cache and the last-token logits are
  repeated n times along the batch (prompt-major: row = prompt * n + sample).
- A prefix that every prompt of a batch starts with (a system prompt and worked examples) can be
  prefilled once for the batch: its cache is repeated over the rows, then the rest of each prompt is
  prefilled after it (`prefix`; `sampler.shared_prefix` decides when).
- Randomness is per row: each row's key is folded with the step, so rows never share randomness.
- A row stops on any stop id (kept in the ids and log-probs: the trainer must learn to emit it) or
  when it reaches its limit of new tokens.
- The whole-run program decodes in windows (`buckets.decode_windows`), growing the cache between them.
- On the CPU (`unroll`), the decode loop unrolls the layers over a per-layer cache and multiplies
  weight-first: each layer matrix is transposed once per program into an output-major copy and the
  LM head runs head-first, because XLA:CPU repacks the right-hand operand of x [B, D] @ W at every call.
- A model with sliding-window layers (`ModelConfig.layer_windows`) decodes over a per-layer cache on
  every backend, its windowed layers keeping a ring buffer of their window (`models.cache`): the
  layers' caches differ in length, so they cannot be stacked for a scan, and decode reads W keys per
  step in those layers instead of the whole context. Off the CPU its layers are unrolled too, sliced
  once per program (no output-major copy, no head-first LM head: those are for XLA:CPU).
- The programs are kept whole on disk when the CLI's compilation cache is on (`mllmjax.aot`), keyed
  by what `compiled` closes over, so a later command runs them without tracing them.
- The whole-run program creates the cache inside (nothing to donate); the streaming decode program
  takes the loop state, cache included, as a donated argument, so XLA updates the cache in place
  instead of allocating and copying a new one for every chunk.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from mllmjax.aot import stored
from mllmjax.models.cache import KVCache, cache_window, grow_cache, init_cache, repeat_rows
from mllmjax.models.config import ModelConfig
from mllmjax.models.params import Params
from mllmjax.models.registry import family
from mllmjax.models.transformer import forward, logits_from_hidden, out_major_layers, split_params
from mllmjax.sampling.strategies import Strategy

_trace_lock = threading.Lock()
_traces = 0


def compile_count() -> int:
    """How many sampler programs have been traced (each trace is one XLA compilation)."""
    return _traces


def _count_trace() -> None:
    global _traces
    with _trace_lock:
        _traces += 1


@struct.dataclass
class DecodeState:
    """The decode loop's carry. Rows are prompt-major: row = prompt * n + sample."""

    cache: KVCache
    last: jax.Array  # [R] int32, the token sampled last (fed at the next step)
    pos: jax.Array  # [R] int32, the position `last` will take
    rope: Any  # the family's rope tables of pos, made one step ahead (see `rope.rope_tables`)
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
    params: Params,
    tokens: jax.Array | None,
    valid: jax.Array,
    limit: jax.Array,
    keys: jax.Array,
    stop_ids: jax.Array,
    prefix: jax.Array | None = None,
    *,
    cfg: ModelConfig,
    strategy: Strategy,
    n: int,
    cache_len: int,
    out_len: int,
    compute_dtype: Any,
    unroll: bool,
    embeds: jax.Array | None = None,
    reach: jax.Array | None = None,
) -> DecodeState:
    """Prefill B prompts [B, P] once, repeat for n samples each, sample every row's first token.

    prefix [1, C]: tokens every prompt starts with (then `tokens` are the rest of each prompt): they
    are prefilled once, their cache repeated over the B rows, and the rest prefilled after them.
    embeds [B, P, D]: the prompts as input embeddings instead of tokens (None then): a vision-language
    model's text embeddings with its image features in place (`mllmjax.models.vision`). reach [B, P]:
    how far ahead each prompt token sees (`transformer.forward`), or None (causal)."""
    b, p = valid.shape
    cdt = jnp.dtype(compute_dtype)
    fam = family(cfg)
    per_layer = per_layer_cache(cfg, unroll)
    start = 0 if prefix is None else prefix.shape[1]
    if prefix is None:
        cache = init_cache(cfg, b, cache_len, cdt, per_layer=per_layer)
    else:
        cache = init_cache(cfg, 1, cache_len, cdt, per_layer=per_layer)
        _, cache = forward(params, cfg, prefix, jnp.arange(start)[None, :], cache=cache, compute_dtype=cdt)
        cache = repeat_rows(cache, b)
    positions = start + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    if reach is not None:
        reach = start + reach
    hidden, cache = forward(
        params, cfg, tokens, positions, embeds=embeds, valid=valid, cache=cache, compute_dtype=cdt, reach=reach
    )
    last_idx = jnp.max(jnp.where(valid, jnp.arange(p)[None, :], -1), axis=1)  # [B]
    # Right or left padding: the next slot is the one after the last valid token.
    cache = cache.replace(index=(start + last_idx + 1).astype(jnp.int32))
    last_hidden = jnp.take_along_axis(hidden, last_idx[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = logits_from_hidden(params, last_hidden, softcap=cfg.final_logit_softcap)  # [B, V]
    lengths = start + valid.sum(axis=1).astype(jnp.int32)

    def rep(x: jax.Array) -> jax.Array:
        return jnp.repeat(x, n, axis=0) if n > 1 else x

    cache = repeat_rows(cache, n)
    rows, pos = b * n, rep(lengths)
    state = DecodeState(
        cache=cache,
        last=jnp.zeros((rows,), jnp.int32),
        pos=pos,
        rope=fam.rope(cfg, pos[:, None]),
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
    params: Params,
    state: DecodeState,
    until: jax.Array,
    stop_ids: jax.Array,
    *,
    cfg: ModelConfig,
    strategy: Strategy,
    compute_dtype: Any,
    unroll: bool,
) -> DecodeState:
    """Decode until every row is done, `until` tokens have been sampled, or a row's next slot is past
    the end of the cache (the end of a window: see `decode_windows`)."""
    cdt = jnp.dtype(compute_dtype)
    fam = family(cfg)
    params = decode_params(params, cfg, unroll)
    window = state.cache.length

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < until) & ~jnp.all(s.done) & (jnp.max(s.cache.index) < window)

    def body(s: DecodeState) -> DecodeState:
        hidden, cache = forward(
            params,
            cfg,
            s.last[:, None],
            s.pos[:, None],
            valid=~s.done[:, None],
            cache=s.cache,
            compute_dtype=cdt,
            rope=s.rope,
        )
        logits = logits_from_hidden(params, hidden[:, 0], head_first=unroll, softcap=cfg.final_logit_softcap)
        pos = s.pos + 1
        rope = fam.rope(cfg, pos[:, None])
        s = s.replace(cache=cache, pos=pos, rope=rope)
        return _record(s, logits, strategy, stop_ids)

    return jax.lax.while_loop(cond, body, state)


# LoRA weights in the CPU decode loop: merged into its output-major copy (True), or run as the low-rank
# path beside the copy of the base weights (False). Read when a program is traced; scripts/bench_lora.py
# measures both (merging was faster: see docs/benchmarks.md).
MERGE_ADAPTERS = True


def per_layer_cache(cfg: ModelConfig, unroll: bool) -> bool:
    """Whether the sampler decodes over a per-layer cache: on the CPU (`unroll`), for a model with
    windowed layers everywhere (see the module docstring), and for one whose layers differ in their
    parameters (its forward unrolls them: `transformer.split_params`)."""
    return unroll or cache_window(cfg) is not None or bool(cfg.layer_stacks())


def decode_params(params: Params, cfg: ModelConfig, unroll: bool) -> Params:
    """params with the layers as the decode loop takes them, sliced once outside it: output-major
    per-layer trees on the CPU (`unroll`), plain per-layer trees for a per-layer cache elsewhere,
    stacked (for the scan) otherwise. Layers already sliced are returned as they are."""
    if isinstance(params["layers"], tuple) or not per_layer_cache(cfg, unroll):
        return params
    if unroll:
        return out_major_layers(params, cfg, MERGE_ADAPTERS)
    return split_params(params, cfg)


@functools.cache
def sliced_layers(cfg: ModelConfig, unroll: bool) -> Callable[[Params], Params]:
    def sliced(params: Params) -> Params:
        _count_trace()
        return decode_params(params, cfg, unroll)

    return stored("sampler.sliced_layers", jax.jit(sliced), (cfg, unroll, MERGE_ADAPTERS))


def _decode_windows(
    params: Params,
    state: DecodeState,
    stop_ids: jax.Array,
    *,
    windows: tuple[int, ...],
    out_len: int,
    **static: Any,
) -> tuple[jax.Array, ...]:
    """The whole run's decode after its prefill: through the windows, growing the cache between them;
    returns (ids, log-probs, counts, stopped)."""
    params = decode_params(params, static["cfg"], static["unroll"])
    for i, window in enumerate(windows):
        if i:
            state = state.replace(cache=grow_cache(state.cache, window))
        state = _decode(params, state, jnp.int32(out_len), stop_ids, **static)
    return state.out_ids, state.out_logprobs, state.count, state.stopped


@functools.cache
def compiled(
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
    static = dict(cfg=cfg, strategy=strategy, compute_dtype=compute_dtype, unroll=unroll)
    shapes = dict(n=n, out_len=out_len)

    def run(params, tokens, valid, limit, keys, stop_ids, prefix=None):
        _count_trace()
        state = _prefill(
            params, tokens, valid, limit, keys, stop_ids, prefix, cache_len=windows[0], **shapes, **static
        )
        return _decode_windows(params, state, stop_ids, windows=windows, out_len=out_len, **static)

    def prefill(params, tokens, valid, limit, keys, stop_ids):
        _count_trace()
        return _prefill(
            params, tokens, valid, limit, keys, stop_ids, cache_len=windows[-1], **shapes, **static
        )

    def decode(params, state, until, stop_ids):
        _count_trace()
        return _decode(params, state, until, stop_ids, **static)

    # The streaming state (KV cache included) is donated: see the module docstring. The programs are
    # kept on disk whole (`mllmjax.aot`), keyed by everything they close over.
    key = (cfg, strategy, compute_dtype, n, windows, out_len, unroll, MERGE_ADAPTERS)
    return (
        stored("sampler.run", jax.jit(run), key),
        stored("sampler.prefill", jax.jit(prefill), key),
        stored("sampler.decode", jax.jit(decode, donate_argnums=(1,)), key),
    )


@functools.cache
def compiled_embeds(
    cfg: ModelConfig,
    strategy: Strategy,
    compute_dtype: str,
    n: int,
    windows: tuple[int, ...],
    out_len: int,
    unroll: bool,
) -> tuple[Callable, Callable]:
    """(whole run, prefill) as `compiled` gives them, for prompts given as input embeddings [B, P, D]
    instead of tokens (a vision-language model's prompts with their images in place): the prefill
    reads the embeddings, then decode runs on tokens as for text (the streaming decode program is
    `compiled`'s). The B prompts are prefilled once and their cache repeated for the n samples each.
    reach [B, P]: the index up to which each prompt token sees (its own, or its image's last token's),
    or None: causal."""
    static = dict(cfg=cfg, strategy=strategy, compute_dtype=compute_dtype, unroll=unroll)
    shapes = dict(n=n, out_len=out_len)

    def run(params, embeds, valid, limit, keys, stop_ids, reach):
        _count_trace()
        state = _prefill(
            params,
            None,
            valid,
            limit,
            keys,
            stop_ids,
            embeds=embeds,
            reach=reach,
            cache_len=windows[0],
            **shapes,
            **static,
        )
        return _decode_windows(params, state, stop_ids, windows=windows, out_len=out_len, **static)

    def prefill(params, embeds, valid, limit, keys, stop_ids, reach):
        _count_trace()
        return _prefill(
            params,
            None,
            valid,
            limit,
            keys,
            stop_ids,
            embeds=embeds,
            reach=reach,
            cache_len=windows[-1],
            **shapes,
            **static,
        )

    key = (cfg, strategy, compute_dtype, n, windows, out_len, unroll, MERGE_ADAPTERS)
    return (
        stored("sampler.run_embeds", jax.jit(run), key),
        stored("sampler.prefill_embeds", jax.jit(prefill), key),
    )
