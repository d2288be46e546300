"""Mixture-of-experts MLP: a softmax router picks each token's top-k experts, and each expert's SwiGLU
runs on the tokens routed to it only (dropless: no token is ever dropped for capacity).

Routing is HF's (Qwen3-MoE, Mixtral): router logits x Wr in the compute dtype, softmax in float32, the
top-k probabilities (renormalised to sum to 1 with `norm_topk_prob`) cast back, and the output
sum_k w_k SwiGLU_{e_k}(x). The experts' weights are one stacked array per projection: gate and up
[E, D, F], down [E, F, D].

Compute proportional to the routed experts, with static shapes: the (token, expert) pairs are sorted by
expert and each expert's group is padded to a whole number of blocks of `bs` rows (megablocks' layout),
so every block belongs to one expert. `block_rows` picks `bs` so that the padding is at most a quarter
of the pairs: the blocks hold at most 1.25 x top-k rows per token, against E rows per token when every
expert runs on every token. The blocks are then run in one of three forms (`impl`):
- "loop": a loop over the blocks that hold pairs (a dynamic trip count: padding blocks never run), each
  reading its expert's weights with a dynamic slice. The default on CPU, where XLA runs a gather at
  about 1 GB/s and a dynamic slice at memory speed, and consecutive blocks of one expert find its
  weights in cache; and on GPU when "blocks" would gather more than `GATHER_BYTES` of weights.
- "blocks": every block at once, each block's expert weights gathered (one batched matmul, no loop):
  the GPU default while the gathered weights stay under `GATHER_BYTES` (a decode step's few pairs).
  Its static FLOPs are exactly the blocks' (the loop runs at most as many of the same blocks), which
  XLA's cost analysis reports; it counts a loop's body once, so it cannot size the loop.
- "ragged": `jax.lax.ragged_dot` on the sorted rows, the TPU default, where it is a grouped matmul
  (XLA:CPU lowers it to a masked product over every expert; untested on GPU, so not used there).
"dense" runs every expert on every token and weights the outputs (zero for unchosen experts): the
reference the others are tested against, and the baseline of `scripts/bench_moe.py`.

"loop" and "blocks" share one custom VJP that saves only the sorted rows and recomputes each block's
gate and up products in the backward pass: the gathered weights of "blocks" are never kept for it, and
the expert-weight gradients are accumulated per block (in float32) instead of as a whole-array
cotangent per block, which autodiff through a loop would add up.

Padding tokens (valid False) are routed (the router statistics skip them) but dispatched to no expert:
their output is 0.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mllmjax.models.blocks.adapters import Adapted
from mllmjax.models.blocks.cpu import OutMajor, weight_first
from mllmjax.models.blocks.mlp import swiglu
from mllmjax.models.params import ParamSpec

IMPLS = ("auto", "loop", "blocks", "ragged", "dense")
MAX_BLOCK = 128  # rows per block at most
PAD_FRACTION = 4  # padding rows at most (pairs / PAD_FRACTION)
GATHER_BYTES = 1 << 30  # "auto" on GPU: "blocks" while its gathered weights stay under this


def moe_specs(d: int, f: int, e: int) -> dict[str, ParamSpec]:
    """The router [D, E] and the stacked experts: gate, up [E, D, F], down [E, F, D]."""
    return {
        "router": ParamSpec((d, e), ("embed", "experts")),
        "experts_gate": ParamSpec((e, d, f), ("experts", "embed", "mlp")),
        "experts_up": ParamSpec((e, d, f), ("experts", "embed", "mlp")),
        "experts_down": ParamSpec((e, f, d), ("experts", "mlp", "embed")),
    }


def resolve_impl(impl: str, gathered_bytes: int, backend: str | None = None) -> str:
    """The grouped-matmul form of `impl`; "auto" follows the backend and, on GPU, the bytes of expert
    weights the "blocks" form would gather (see the module docstring)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return "ragged"
    return "blocks" if backend == "gpu" and gathered_bytes <= GATHER_BYTES else "loop"


def gathered_bytes(tokens: int, top_k: int, num_experts: int, d: int, f: int, itemsize: int) -> int:
    """The expert weights (gate, up, down) the "blocks" form gathers for `tokens` tokens."""
    pairs = tokens * top_k
    return num_blocks(pairs, num_experts, block_rows(pairs, num_experts)) * 3 * d * f * itemsize


# ------------------------------------------------------------------------------------------ routing
def route(
    x: jax.Array, router: jax.Array | OutMajor, top_k: int, norm_topk_prob: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [N, D] -> (float32 router probabilities [N, E], expert ids [N, k], their weights [N, k] in
    x's dtype), as HF's top-k router computes them."""
    logits = _matmul(x, router)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, idx = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return probs, idx.astype(jnp.int32), top.astype(logits.dtype)


def router_stats(probs: jax.Array, idx: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """One layer's sums over its real tokens, for the load-balancing loss: assignments per expert
    [E], router probability per expert [E], and the token count. Summed over layers by the driver."""
    v = valid.astype(jnp.float32)
    num_experts = probs.shape[-1]
    chosen = jax.nn.one_hot(idx, num_experts, dtype=jnp.float32).sum(axis=1)  # [N, E]
    return {
        "router_counts": jax.lax.stop_gradient(jnp.sum(chosen * v[:, None], axis=0)),
        "router_probs": jnp.sum(probs * v[:, None], axis=0),
        "router_tokens": jnp.sum(v),
    }


def no_router_stats(num_experts: int) -> dict[str, jax.Array]:
    """`router_stats` of a layer without a router (a dense layer of a mixed model): zeros, so the sum
    over layers covers the expert layers only, as HF's loss does."""
    zeros = jnp.zeros((num_experts,), jnp.float32)
    return {"router_counts": zeros, "router_probs": zeros, "router_tokens": jnp.zeros((), jnp.float32)}


def load_balancing_loss(aux: dict[str, jax.Array]) -> jax.Array:
    """HF's `load_balancing_loss_func` (Switch Transformer) from the router statistics summed over the
    layers: E * sum_e (assignments_e / rows) * (probability_e / rows), rows = layers x real tokens."""
    rows = jnp.maximum(aux["router_tokens"], 1.0)
    counts, probs = aux["router_counts"], aux["router_probs"]
    return counts.shape[-1] * jnp.sum((counts / rows) * (probs / rows))


# ------------------------------------------------------------------------------------------ dispatch
class Dispatch(NamedTuple):
    """Where each (token, expert) pair goes: rows sorted by expert, each expert's group padded to
    whole blocks. R = blocks x bs rows."""

    row_token: jax.Array  # [R] the token of each row; N (a zero row) for padding rows
    pair_row: jax.Array  # [M] the row of each pair; R (a zero row) for pairs of padding tokens
    block_expert: jax.Array  # [blocks] the expert of each block (the last expert past the used blocks)
    used_blocks: jax.Array  # [] how many blocks hold pairs
    group_rows: jax.Array  # [E] rows of each expert's group (its pairs rounded up to whole blocks)


def block_rows(pairs: int, num_experts: int) -> int:
    """Rows per block: the largest power of two up to MAX_BLOCK whose worst-case padding (bs - 1 rows
    for each expert that has pairs) is at most pairs / PAD_FRACTION. A decode step's few pairs get 1."""
    groups = min(num_experts, pairs)
    bs = 1
    while bs * 2 <= MAX_BLOCK and groups * (bs * 2 - 1) * PAD_FRACTION <= pairs:
        bs *= 2
    return bs


def num_blocks(pairs: int, num_experts: int, bs: int) -> int:
    """The most blocks `pairs` pairs can need: sum_e ceil(n_e / bs) <= (pairs + groups (bs - 1)) / bs."""
    return (pairs + min(num_experts, pairs) * (bs - 1)) // bs


def dispatch(idx: jax.Array, valid: jax.Array, num_experts: int, bs: int) -> Dispatch:
    """The dispatch of the pairs (token n, expert idx[n, j]) of the valid tokens ([N, k], [N])."""
    n, k = idx.shape
    m = n * k
    nb = num_blocks(m, num_experts, bs)
    rows = nb * bs
    expert = jnp.where(jnp.repeat(valid, k), idx.reshape(m), num_experts)  # padding tokens: no expert
    order = jnp.argsort(expert, stable=True)
    sorted_expert = expert[order]
    counts = jnp.zeros(num_experts + 1, jnp.int32).at[expert].add(1)[:num_experts]
    padded = (counts + bs - 1) // bs * bs
    group_end = jnp.cumsum(padded)
    group_start = group_end - padded
    first = jnp.cumsum(counts) - counts  # each expert's first position in sorted order
    e = jnp.minimum(sorted_expert, num_experts - 1)
    rank = jnp.arange(m, dtype=jnp.int32) - first[e]
    dest = jnp.where(sorted_expert < num_experts, group_start[e] + rank, rows)
    pair_row = jnp.zeros(m, jnp.int32).at[order].set(dest)
    row_pair = jnp.full(rows, m, jnp.int32).at[dest].set(order.astype(jnp.int32), mode="drop")
    starts = jnp.arange(nb, dtype=jnp.int32) * bs
    block_expert = jnp.searchsorted(group_end, starts, side="right").astype(jnp.int32)
    return Dispatch(
        row_token=row_pair // k,
        pair_row=pair_row,
        block_expert=jnp.minimum(block_expert, num_experts - 1),
        used_blocks=(group_end[-1] // bs).astype(jnp.int32),
        group_rows=padded,
    )


# ------------------------------------------------------------------------------------------ the MLP
def moe_mlp(
    x: jax.Array,
    router: jax.Array | OutMajor,
    gate: jax.Array | OutMajor,
    up: jax.Array | OutMajor,
    down: jax.Array | OutMajor,
    *,
    top_k: int,
    norm_topk_prob: bool,
    valid: jax.Array | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The routed SwiGLU of x [B, T, D]; returns (output [B, T, D], `router_stats`).

    router [D, E]; gate, up [E, D, F]; down [E, F, D] (or their `OutMajor` forms in a CPU decode loop,
    whose t is [F, E*D] and [D, E*F]). valid [B, T]: the real tokens (default all)."""
    # LoRA adapters on the experts: merged per layer (one layer's expert weights at a time).
    gate, up, down = (w.merged() if isinstance(w, Adapted) else w for w in (gate, up, down))
    b, t, d = x.shape
    xf = x.reshape(b * t, d)
    vf = jnp.ones(b * t, bool) if valid is None else valid.reshape(b * t)
    probs, idx, weights = route(xf, router, top_k, norm_topk_prob)
    num_experts = probs.shape[-1]
    f = gate.out_shape[0] if isinstance(gate, OutMajor) else gate.shape[-1]
    form = resolve_impl(impl, gathered_bytes(b * t, top_k, num_experts, d, f, x.dtype.itemsize))
    if form == "dense":
        out = _dense_experts(xf, gate, up, down, idx, weights, num_experts)
    else:
        out = _routed_experts(xf, gate, up, down, idx, weights, vf, num_experts, form)
    return out.reshape(b, t, d), router_stats(probs, idx, vf)


def _routed_experts(
    x: jax.Array,
    gate: Any,
    up: Any,
    down: Any,
    idx: jax.Array,
    weights: jax.Array,
    valid: jax.Array,
    num_experts: int,
    form: str,
) -> jax.Array:
    """sum_k weights[:, k] SwiGLU_{idx[:, k]}(x) through the sorted, block-padded rows."""
    n, k = idx.shape
    bs = 1 if form == "ragged" else block_rows(n * k, num_experts)  # ragged_dot needs no padding
    plan = dispatch(idx, valid, num_experts, bs)
    rows = jnp.take(_with_zero_row(x), plan.row_token, axis=0)  # [R, D]
    if form == "ragged":
        ys = _ragged_swiglu(rows, gate, up, down, plan.group_rows)
    elif isinstance(gate, OutMajor):  # a CPU decode loop: forward only
        ys = _loop_forward(rows, gate, up, down, plan.block_expert, plan.used_blocks, bs, num_experts)
    else:
        ys = grouped_swiglu(rows, gate, up, down, plan.block_expert, plan.used_blocks, bs, form)
    per_pair = jnp.take(_with_zero_row(ys), plan.pair_row, axis=0).reshape(n, k, -1)
    return jnp.sum(per_pair * weights[..., None], axis=1)


def _with_zero_row(x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])


def _dense_experts(
    x: jax.Array, gate: Any, up: Any, down: Any, idx: jax.Array, weights: jax.Array, num_experts: int
) -> jax.Array:
    """Every expert on every token, weighted by the routing weights (0 for unchosen experts)."""
    w = jnp.sum(jax.nn.one_hot(idx, num_experts, dtype=weights.dtype) * weights[..., None], axis=1)  # [N, E]
    if isinstance(gate, OutMajor):  # t: [F, E*D] and [D, E*F]; one weight-first product each
        f = gate.t.shape[0]
        g = weight_first(gate.t.reshape(f * num_experts, -1), x).reshape(-1, f, num_experts)
        u = weight_first(up.t.reshape(f * num_experts, -1), x).reshape(-1, f, num_experts)
        h = swiglu(g, u).transpose(0, 2, 1) * w[..., None]  # [N, E, F]
        return weight_first(down.t, h.reshape(h.shape[0], -1))
    h = swiglu(jnp.einsum("nd,edf->nef", x, gate), jnp.einsum("nd,edf->nef", x, up))
    return jnp.einsum("nef,efd->nd", h * w[..., None], down)


def _ragged_swiglu(rows: jax.Array, gate: Any, up: Any, down: Any, group_rows: jax.Array) -> jax.Array:
    """The expert SwiGLU of rows sorted by expert, groups of `group_rows` rows, through ragged_dot.
    Rows past the groups (padding tokens' rows) are zero, and join the last group."""
    group_rows = group_rows.at[-1].add(rows.shape[0] - jnp.sum(group_rows))
    h = swiglu(jax.lax.ragged_dot(rows, gate, group_rows), jax.lax.ragged_dot(rows, up, group_rows))
    return jax.lax.ragged_dot(h, down, group_rows)


# ------------------------------------------------------------------------------- the grouped matmul
def _matmul(x: jax.Array, w: jax.Array | OutMajor) -> jax.Array:
    """x [..., D] @ w [D, F], or weight-first with an output-major w."""
    if isinstance(w, OutMajor):
        return weight_first(w.t, x)
    return jnp.einsum("...D,DF->...F", x, w)


def _expert_weight(w: jax.Array | OutMajor, e: jax.Array, num_experts: int) -> jax.Array | OutMajor:
    """Expert e's [in, out] matrix of a stacked [E, in, out] weight (or its output-major [out, in])."""
    if isinstance(w, OutMajor):  # t [out, E*in]: expert e's columns
        width = w.t.shape[1] // num_experts
        return OutMajor(jax.lax.dynamic_slice_in_dim(w.t, e * width, width, axis=1), w.out_shape)
    return jax.lax.dynamic_index_in_dim(w, e, keepdims=False)


def _loop_forward(
    rows: jax.Array,
    gate: Any,
    up: Any,
    down: Any,
    block_expert: jax.Array,
    used_blocks: jax.Array,
    bs: int,
    num_experts: int,
) -> jax.Array:
    """The blocks' SwiGLU, one used block at a time (blocks past `used_blocks` hold no pair)."""

    def body(i: jax.Array, ys: jax.Array) -> jax.Array:
        e = block_expert[i]
        xb = jax.lax.dynamic_slice_in_dim(rows, i * bs, bs)
        g = _matmul(xb, _expert_weight(gate, e, num_experts))
        u = _matmul(xb, _expert_weight(up, e, num_experts))
        y = _matmul(swiglu(g, u), _expert_weight(down, e, num_experts))
        return jax.lax.dynamic_update_slice_in_dim(ys, y.astype(ys.dtype), i * bs, 0)

    d_out = down.t.shape[0] if isinstance(down, OutMajor) else down.shape[-1]
    return jax.lax.fori_loop(0, used_blocks, body, jnp.zeros((rows.shape[0], d_out), rows.dtype))


def _blocks_forward(
    rows: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, block_expert: jax.Array, bs: int
) -> jax.Array:
    """The blocks' SwiGLU all at once: [blocks, bs, D] rows against each block's gathered weights."""
    xb = rows.reshape(-1, bs, rows.shape[1])
    g = jnp.einsum("nbd,ndf->nbf", xb, gate[block_expert])
    u = jnp.einsum("nbd,ndf->nbf", xb, up[block_expert])
    y = jnp.einsum("nbf,nfd->nbd", swiglu(g, u), down[block_expert])
    return y.reshape(rows.shape[0], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def grouped_swiglu(
    rows: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    block_expert: jax.Array,
    used_blocks: jax.Array,
    bs: int,
    form: str,
) -> jax.Array:
    """SwiGLU_{block_expert[i]} of each block i of `rows` [blocks * bs, D] ("loop" or "blocks")."""
    if form == "loop":
        return _loop_forward(rows, gate, up, down, block_expert, used_blocks, bs, gate.shape[0])
    return _blocks_forward(rows, gate, up, down, block_expert, bs)


def _grouped_fwd(
    rows: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    block_expert: jax.Array,
    used_blocks: jax.Array,
    bs: int,
    form: str,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    ys = grouped_swiglu(rows, gate, up, down, block_expert, used_blocks, bs, form)
    return ys, (rows, gate, up, down, block_expert, used_blocks)


def _block_grads(
    xb: jax.Array, dy: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, batch: str
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(d rows, d gate, d up, d down) of blocks xb [..., bs, D] with output cotangent dy, their
    weights wg, wu [..., D, F], wd [..., F, D]; `batch` names the leading block dims ("" or "n").
    The gate and up products are recomputed; weight gradients in float32."""
    n = batch
    g = jnp.einsum(f"{n}bd,{n}df->{n}bf", xb, wg)
    u = jnp.einsum(f"{n}bd,{n}df->{n}bf", xb, wu)
    h, swiglu_vjp = jax.vjp(swiglu, g, u)
    d_down = jnp.einsum(f"{n}bf,{n}bd->{n}fd", h, dy, preferred_element_type=jnp.float32)
    dg, du = swiglu_vjp(jnp.einsum(f"{n}bd,{n}fd->{n}bf", dy, wd))
    d_gate = jnp.einsum(f"{n}bd,{n}bf->{n}df", xb, dg, preferred_element_type=jnp.float32)
    d_up = jnp.einsum(f"{n}bd,{n}bf->{n}df", xb, du, preferred_element_type=jnp.float32)
    dx = jnp.einsum(f"{n}bf,{n}df->{n}bd", dg, wg) + jnp.einsum(f"{n}bf,{n}df->{n}bd", du, wu)
    return dx, d_gate, d_up, d_down


def _grouped_bwd(bs: int, form: str, res: tuple[jax.Array, ...], dys: jax.Array) -> tuple[Any, ...]:
    rows, gate, up, down, block_expert, used_blocks = res
    if form == "loop":
        dx, dg, du, dd = _loop_backward(rows, dys, gate, up, down, block_expert, used_blocks, bs)
    else:
        dx, dg, du, dd = _blocks_backward(rows, dys, gate, up, down, block_expert, bs)
    return dx, dg.astype(gate.dtype), du.astype(up.dtype), dd.astype(down.dtype), None, None


grouped_swiglu.defvjp(_grouped_fwd, _grouped_bwd)


def _loop_backward(
    rows: jax.Array,
    dys: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    block_expert: jax.Array,
    used_blocks: jax.Array,
    bs: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The backward of `_loop_forward`: each used block adds its weight gradients into its expert's
    slice of float32 accumulators, in place."""

    def add(acc: jax.Array, e: jax.Array, g: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_index_in_dim(acc, acc[e] + g, e, 0)

    def body(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        dx, dg, du, dd = carry
        e = block_expert[i]
        xb = jax.lax.dynamic_slice_in_dim(rows, i * bs, bs)
        dy = jax.lax.dynamic_slice_in_dim(dys, i * bs, bs)
        wg, wu, wd = (jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in (gate, up, down))
        dxb, dgb, dub, ddb = _block_grads(xb, dy, wg, wu, wd, "")
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dxb.astype(dx.dtype), i * bs, 0)
        return dx, add(dg, e, dgb), add(du, e, dub), add(dd, e, ddb)

    init = (
        jnp.zeros_like(rows),
        jnp.zeros(gate.shape, jnp.float32),
        jnp.zeros(up.shape, jnp.float32),
        jnp.zeros(down.shape, jnp.float32),
    )
    return jax.lax.fori_loop(0, used_blocks, body, init)


def _blocks_backward(
    rows: jax.Array,
    dys: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    block_expert: jax.Array,
    bs: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The backward of `_blocks_forward`: the weights gathered again, per-block weight gradients summed
    into their experts."""
    d = rows.shape[1]
    xb, dy = rows.reshape(-1, bs, d), dys.reshape(-1, bs, dys.shape[1])
    wg, wu, wd = gate[block_expert], up[block_expert], down[block_expert]
    dx, dg, du, dd = _block_grads(xb, dy, wg, wu, wd, "n")
    e = gate.shape[0]
    sums = (jax.ops.segment_sum(g, block_expert, num_segments=e) for g in (dg, du, dd))
    return (dx.reshape(rows.shape).astype(rows.dtype), *sums)
