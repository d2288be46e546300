"""Ring-buffer KV caches of sliding-window layers (`mllmjax.models.cache`): what the ring holds, the
logits through it, its shapes and growth, and the sampler over it.

The oracle of the ring's contents is the same forward over a cache without rings (every layer
full-length, the window only a mask: how windowed layers were cached before the ring), whose
valid slots of largest position are what the ring must hold; the oracle of the logits is the full
uncached forward (itself checked against HF in test_decoder_parity.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import make_hf_model

from mllmjax import models
from mllmjax.models import transformer
from mllmjax.models.cache import KVCache, grow_cache, init_cache
from mllmjax.sampling import Greedy, Sample, generate, programs, sampler
from mllmjax.weights.table import params_from_hf

TOL = 1e-4
WINDOW = 5  # tests/hf_models.py's gemma configs
ROWS, TOTAL, SLOTS = 3, 32, 48
# Two prefill chunks: valid tokens per row and the chunk width (the second chunk is longer than the
# window, and one row's part of it is shorter), then DECODE one-token steps, which wrap the ring.
CHUNKS = (((3, 9, 12), 14), ((7, 2, 6), 8))
DECODE = 12


@functools.cache
def _model(name: str):
    model = make_hf_model(name, seed=7, num_layers=4)
    cfg = models.from_hf_config({**model.config.to_dict(), "architectures": [type(model).__name__]})
    assert cfg.sliding_window == WINDOW and any(w is None for w in cfg.layer_windows())
    seqs = np.random.default_rng(8).integers(0, cfg.vocab_size, (ROWS, TOTAL))
    return cfg, params_from_hf(cfg, model.state_dict()), seqs


def _without_rings(cfg, batch: int, length: int) -> KVCache:
    """A per-layer cache whose every layer is full-length (the window only masks): the oracle."""
    ring = init_cache(cfg, batch, length)
    k = tuple(jnp.zeros((batch, cfg.num_kv_heads, cfg.head_dim, length)) for _ in range(cfg.num_layers))
    v = tuple(jnp.zeros((batch, cfg.num_kv_heads, length, cfg.head_dim)) for _ in range(cfg.num_layers))
    return ring.replace(k=k, v=v, ring_pos=None, windows=())


def _chunks(seqs: np.ndarray, padding: str):
    """The prefill chunks of CHUNKS as (tokens, positions, valid), padded on the `padding` side."""
    start = np.zeros(ROWS, int)
    for counts, width in CHUNKS:
        tok, pos, val = (np.zeros((ROWS, width), t) for t in (np.int32, np.int32, bool))
        for b, n in enumerate(counts):
            cols = slice(width - n, width) if padding == "left" else slice(0, n)
            tok[b, cols] = seqs[b, start[b] : start[b] + n]
            pos[b, cols] = np.arange(start[b], start[b] + n)
            val[b, cols] = True
        start += counts
        yield tok, pos, val


def _replay(cfg, params, seqs, padding: str, cache: KVCache, decode_params=None, head_first=False):
    """Both prefill chunks, then DECODE steps; yields (cache, [(row, position, logits)]) after each.
    A chunk's next slot is the one after its last valid column, as the sampler sets it (left padding
    takes full-length slots); decode_params / head_first: the decode steps' form of the params."""
    cap = cfg.final_logit_softcap

    def logits(p, h):
        return np.asarray(transformer.logits_from_hidden(p, h, head_first=head_first, softcap=cap))

    for tok, pos, val in _chunks(seqs, padding):
        last = np.max(np.where(val, np.arange(val.shape[1]), -1), axis=1)
        index = cache.index + last + 1
        hidden, cache = transformer.forward(params, cfg, tok, pos, valid=val, cache=cache)
        cache = cache.replace(index=index)
        lg = np.asarray(transformer.logits_from_hidden(params, hidden, softcap=cap))
        yield cache, [(b, pos[b, t], lg[b, t]) for b, t in zip(*np.nonzero(val), strict=True)]
    start = np.array([sum(c[0][b] for c in CHUNKS) for b in range(ROWS)])
    dp = params if decode_params is None else decode_params
    for step in range(DECODE):
        p = start + step
        hidden, cache = transformer.forward(
            dp, cfg, seqs[np.arange(ROWS), p][:, None], p[:, None], cache=cache
        )
        lg = logits(dp, hidden[:, 0])
        yield cache, [(b, p[b], lg[b]) for b in range(ROWS)]


def _ring_layers(cfg) -> list[int]:
    return [i for i, w in enumerate(cfg.layer_windows()) if w is not None]


@pytest.mark.parametrize("padding", ["right", "left"])
def test_ring_holds_the_latest_window_of_tokens(padding):
    """After prefill chunks shorter and longer than the window, left- or right-padded, and after decode
    steps that wrap around, each ring holds exactly the keys, values and positions of the last R = W
    real tokens of its row (as the full-length oracle holds them), and nothing else."""
    cfg, params, seqs = _model("gemma3")
    ring_run = _replay(cfg, params, seqs, padding, init_cache(cfg, ROWS, SLOTS))
    full_run = _replay(cfg, params, seqs, padding, _without_rings(cfg, ROWS, SLOTS))
    for (ring, _), (full, _) in zip(ring_run, full_run, strict=True):
        assert ring.ring_pos.shape == (ROWS, WINDOW)
        for b in range(ROWS):
            fpos = np.asarray(full.pos[b])
            slots = np.argsort(fpos)[-WINDOW:]
            slots = slots[fpos[slots] >= 0]  # the last (up to) W real tokens' full-length slots
            rpos = np.asarray(ring.ring_pos[b])
            order = np.argsort(rpos)[-len(slots) :]
            assert (rpos >= 0).sum() == len(slots)
            np.testing.assert_array_equal(rpos[order], fpos[slots])
            for i in _ring_layers(cfg):
                for got, want, axis in ((ring.k[i], full.k[i], 3), (ring.v[i], full.v[i], 2)):
                    got = np.take(np.asarray(got[b]), order, axis=axis - 1)
                    want = np.take(np.asarray(want[b]), slots, axis=axis - 1)
                    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["per-layer", "out-major"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_cached_prefill_and_decode_through_rings_match_full_forward(name, padding, layout):
    """Prefill chunks (one longer than the window, padded rows) and decode steps through ring caches
    give the full forward's logits, with the decode steps in either form the sampler uses: per-layer
    trees of the stored matrices (accelerators) or output-major ones with a head-first LM head (CPU)."""
    cfg, params, seqs = _model(name)
    full = np.asarray(transformer.logits(params, cfg, seqs))
    unroll = layout == "out-major"
    decode_params = programs.decode_params(params, cfg, unroll)
    run = _replay(cfg, params, seqs, padding, init_cache(cfg, ROWS, SLOTS), decode_params, head_first=unroll)
    checked = 0
    for _, outputs in run:
        for b, p, lg in outputs:
            np.testing.assert_allclose(lg, full[b, p], atol=TOL, rtol=0, err_msg=f"row {b} position {p}")
            checked += 1
    assert checked == sum(sum(c[0]) for c in CHUNKS) + ROWS * DECODE


def test_ring_shapes_and_growth():
    """Windowed layers hold min(W, S) slots in either requested layout and keep W when the cache grows
    past it; a ring smaller than W (a short cache) grows by padding up to W."""
    cfg, _, _ = _model("gemma3")
    rings, k_heads, h = _ring_layers(cfg), cfg.num_kv_heads, cfg.head_dim

    def slots(cache: KVCache) -> list[int]:
        for k, v in zip(cache.k, cache.v, strict=True):
            assert k.shape[:3] == (2, k_heads, h) and v.shape[:2] + v.shape[3:] == (2, k_heads, h)
            assert k.shape[3] == v.shape[2]
        return [k.shape[3] for k in cache.k]

    def expect(ring: int, full: int) -> list[int]:
        return [ring if i in rings else full for i in range(cfg.num_layers)]

    for per_layer in (False, True):
        cache = init_cache(cfg, 2, SLOTS, per_layer=per_layer)
        assert cache.per_layer and slots(cache) == expect(WINDOW, SLOTS)
        assert cache.ring_pos.shape == (2, WINDOW)
    grown = grow_cache(init_cache(cfg, 2, SLOTS), 80)
    assert slots(grown) == expect(WINDOW, 80) and grown.ring_pos.shape == (2, WINDOW)
    short = init_cache(cfg, 2, 3)
    assert slots(short) == expect(3, 3) and short.ring_pos.shape == (2, 3)
    assert slots(grow_cache(short, 4)) == expect(4, 4)
    assert slots(grow_cache(short, 30)) == expect(WINDOW, 30)
    np.testing.assert_array_equal(grow_cache(short, 30).ring_pos, -1)


@pytest.mark.parametrize("unroll", [False, True], ids=["accelerator", "cpu"])
def test_sampler_prefills_into_rings_of_the_window(unroll):
    """The sampler's own cache (its prefill program, traced for shapes only) has W-slot rings on both
    of its paths, repeated for the n samples of each prompt."""
    cfg, params, _ = _model("gemma2")
    b, p, n = 2, 16, 3
    state = jax.eval_shape(
        functools.partial(
            programs._prefill, cfg=cfg, strategy=Greedy(), n=n, cache_len=48, out_len=32,
            compute_dtype="float32", unroll=unroll,
        ),
        params, jnp.zeros((b, p), jnp.int32), jnp.ones((b, p), bool), jnp.full((b,), 32, jnp.int32),
        jax.random.split(jax.random.key(0), b * n), jnp.zeros((1,), jnp.int32),
    )  # fmt: skip
    cache = state.cache
    assert cache.per_layer and cache.ring_pos.shape == (b * n, WINDOW)
    for i, w in enumerate(cfg.layer_windows()):
        assert cache.k[i].shape[3] == cache.v[i].shape[2] == (48 if w is None else WINDOW)


@pytest.mark.parametrize("unroll", [False, True], ids=["accelerator", "cpu"])
def test_sampler_through_growing_rings_equals_full_length_caches(monkeypatch, unroll):
    """A window larger than the first decode window: the rings start at the cache's length, grow by
    padding to W, then wrap. Sampling through them gives the tokens and log-probs of the same sampler
    over full-length caches (the window only a mask)."""
    cfg = models.tiny("gemma3", num_layers=3, sliding_window=64, max_position_embeddings=512)
    params = transformer.init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(12)
    prompts = [rng.integers(0, cfg.vocab_size, size=n).tolist() for n in (3, 14, 9)]
    assert sampler.decode_windows(16, 128)[0] < 64  # the ring grows before it wraps
    args = dict(n=2, max_new_tokens=100, seed=5, unroll_layers=unroll)
    ringed = generate(params, cfg, prompts, Sample(temperature=1.0), **args)
    # A distinct config (so no compiled program is shared) whose layers keep no rings.
    plain = dataclasses.replace(cfg, max_position_embeddings=513)
    monkeypatch.setattr(type(cfg), "layer_windows", lambda self: (None,) * self.num_layers)
    full = generate(params, plain, prompts, Sample(temperature=1.0), **args)
    assert [c.ids for c in ringed] == [c.ids for c in full]
    assert max(len(c.ids) for c in ringed) == 100
    for a, b in zip(ringed, full, strict=True):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
