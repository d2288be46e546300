"""PPO epochs of the GRPO loss over a batch of scored completions.

Design decisions:
- `TrainState` (params, optimizer state, update count, RNG) is one pytree, so saving and restoring it
  resumes bit for bit; the RNG only shuffles rows into minibatches.
- One jitted `update` makes one optimizer update from one minibatch: it splits the rows into
  micro-batches, runs forward + backward on each inside a `lax.scan`, and sums their gradients. The
  loss weights of every token are computed from the whole minibatch's completion mask before the split
  (see `mllmjax.loss`), so the summed gradient is the minibatch's gradient for any micro-batch size.
- `Trainer.train_on_batch` is the PPO driver: E epochs x M minibatches of updates. Epoch 0 uses
  old = stop_gradient(current) (ratio 1) and records those log-probs as the old log-probs of later
  epochs; log-probs passed in the batch (e.g. the sampler's) are used as-is instead.
- When the batch carries the sampler's log-probs, every update reports `logp_mismatch_mean`/`_max`:
  |old - sampler| over its completion tokens, the sampler/trainer drift users watch (~0 in float32).
- The loss variants (GSPO's sequence ratio, CISPO, the entropy bonus) live in `mllmjax.loss`; the
  trainer passes the per-token entropy to the loss and asks for its gradient only when the entropy
  coefficient is > 0 (otherwise the entropy stays a metric, with no backward cost).
- Reference log-probs for the KL term are computed once per batch (the reference is frozen), and the
  reference parameters are kept only when beta > 0.
- LoRA (`mllmjax.lora`, cfg.lora.rank > 0): the state's params are the adapters alone, so gradients,
  optimizer state and the accumulator exist for them only; the frozen base is an argument of every
  jitted function (never a constant baked into the program) and is the KL reference, adapters off.
  Dropout keys come from the state's RNG folded with the update count and the micro-batch.
- A mixture-of-experts model's router load-balancing loss (HF's `load_balancing_loss_func`) is reported
  as `router_aux` and, times `router_aux_coef`, added to the loss. Its product of means does not split
  over micro-batches, so it is taken per micro-batch (as HF takes it per forward call) and averaged
  over them, each weighted by its share of the rows: with one micro-batch it is HF's value exactly.
- Batch layout: tokens [B, T] with each prompt left-padded so every completion starts at or after the
  static `completion_start`; the LM head then only sees positions that predict completion tokens.
- Functions are mesh-agnostic: they are jitted without explicit shardings, so parameters and batches
  placed on a mesh keep their shardings and XLA partitions the computation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from mllmjax.distributed import to_host
from mllmjax.errors import BadInputError
from mllmjax.faults import signal_point
from mllmjax.lora import LoraConfig, attach
from mllmjax.loss import LossConfig, aggregation_weights, combine_metrics, grpo_loss, sequence_logprobs
from mllmjax.models.blocks.kernels import Kernel, resolve_attention
from mllmjax.models.blocks.moe import load_balancing_loss
from mllmjax.models.config import ModelConfig
from mllmjax.models.transformer import (
    fold_groups,
    forward,
    join_params,
    layer_specs,
    lm_head,
    split_params,
    unfold_groups,
)
from mllmjax.optim import OptimConfig, make_optimizer
from mllmjax.settings import DEFAULTS
from mllmjax.sharding import mesh_axes

Params = dict[str, Any]

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
LAYER_LOOPS = ("auto", "scan", "unroll")


def unrolls_layers(layer_loop: str, remat: str = "none", backend: str | None = None) -> bool:
    """Whether the training forward unrolls the model's layers: layer_loop "unroll", or "auto" on a CPU
    without remat.

    On a CPU the scan over stacked layers copies every layer's saved activations into (and back out
    of) the stacked residual buffers and every layer's gradient into the stacked gradient; unrolled,
    each layer's activations and gradient are buffers of their own. Elsewhere "auto" scans: compile
    time stays flat in depth, and accelerators have no such copies to save. With a remat policy "auto"
    scans too: remat is there to save memory, and only the scan holds XLA to recomputing one layer at a
    time (unrolled, XLA:CPU may schedule the recomputations so that the peak grows)."""
    if layer_loop == "auto":
        return remat == "none" and (backend or jax.default_backend()) == "cpu"
    return layer_loop == "unroll"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ppo_epochs: int = DEFAULTS.ppo_epochs
    minibatches: int = DEFAULTS.minibatches
    # Rows per micro-batch; None = the whole minibatch in one pass.
    micro_batch: int | None = DEFAULTS.micro_batch
    remat: str = DEFAULTS.remat
    # Decoder layers in the training forward: scan, unroll, or auto (unroll on a CPU; `unrolls_layers`).
    layer_loop: str = DEFAULTS.layer_loop
    compute_dtype: str | None = DEFAULTS.compute_dtype
    # Attention for the training forward: auto, xla, cudnn or pallas (kernels.resolve_attention).
    attention: str = DEFAULTS.attention
    # The sampling temperature: logits are divided by it before the softmax.
    temperature: float = DEFAULTS.temperature
    # Tokens per chunk of LM-head logits. For the backward, recompute=False keeps every chunk's softmax,
    # True recomputes each chunk's logits, None keeps up to 1 GiB per micro-batch (loss.keeps_softmax).
    logit_chunk: int = 256
    logit_recompute: bool | None = None
    shuffle: bool = True
    # Mixture-of-experts models: the weight of the router's load-balancing loss in the loss.
    router_aux_coef: float = DEFAULTS.router_aux_coef
    # LoRA adapters on a frozen base (rank 0: full fine-tuning).
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    # Rows that share a prompt (Batch.prompt_rows) run it once per group, forward and backward.
    shared_prompt: bool = DEFAULTS.shared_prompt
    # Vision-language models (`mllmjax.vision_training`): which parts besides the language model train.
    train_vision: bool = DEFAULTS.train_vision
    train_projector: bool = DEFAULTS.train_projector

    def __post_init__(self) -> None:
        if self.ppo_epochs < 1:
            raise BadInputError(f"ppo_epochs must be >= 1, got {self.ppo_epochs!r}")
        if self.minibatches < 1:
            raise BadInputError(f"minibatches must be >= 1, got {self.minibatches!r}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise BadInputError(f"micro_batch must be >= 1, got {self.micro_batch!r}")
        if self.remat not in REMAT_POLICIES:
            raise BadInputError(
                f"unknown remat policy {self.remat!r}; choose one of {', '.join(REMAT_POLICIES)}"
            )
        if self.layer_loop not in LAYER_LOOPS:
            raise BadInputError(
                f"unknown layer loop {self.layer_loop!r}; choose one of {', '.join(LAYER_LOOPS)}"
            )
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise BadInputError(
                f"unknown compute dtype {self.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}"
            )
        # Name and backend are checked here; the dtype (known once params arrive) at the first trace.
        resolve_attention(self.attention, self.compute_dtype or jnp.bfloat16)
        if not self.temperature > 0:
            raise BadInputError(f"temperature must be > 0 for training, got {self.temperature!r}")
        if self.logit_chunk < 1:
            raise BadInputError(f"logit_chunk must be >= 1, got {self.logit_chunk!r}")
        if not self.router_aux_coef >= 0:
            raise BadInputError(f"router_aux_coef must be >= 0, got {self.router_aux_coef!r}")


@struct.dataclass
class TrainState:
    params: Params
    opt_state: Any
    step: jax.Array  # [] int32: optimizer updates applied so far
    rng: jax.Array  # [2] uint32 raw PRNG key


@struct.dataclass
class Batch:
    """One batch of completions. All arrays have B rows; [B, T] arrays are aligned with `tokens`.

    old_logps/sampler_logps[b, t] = log p(tokens[b, t] | tokens[b, <t]) on completion tokens (0 elsewhere).
    """

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32
    valid: jax.Array  # [B, T] bool: prompt or completion, not padding
    completion: jax.Array  # [B, T] bool: the tokens the loss is over
    advantages: jax.Array  # [B] float32
    old_logps: jax.Array | None = None  # [B, T]
    sampler_logps: jax.Array | None = None  # [B, T], for truncated importance sampling
    ref_logps: jax.Array | None = None  # [B, T], filled by the trainer when beta > 0
    # A vision-language model's batch (`mllmjax.vision_training`): each row's images, padded with
    # unused ones to K per row; the image tokens of a row's prompt take its images' features in order.
    pixels: jax.Array | None = None  # [B, K, C, H, W]
    # What a frozen vision tower makes of `pixels` (the projector's input), filled once per batch.
    image_features: jax.Array | None = None  # [B, K, P, F]
    completion_start: int = struct.field(pytree_node=False, default=1)
    # Each run of this many rows (from row 0) has one prompt: equal tokens, positions and valid before
    # completion_start (`training.prompt_rows` finds it). 1: no claim. `rows()` resets it to 1.
    prompt_rows: int = struct.field(pytree_node=False, default=1)

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, idx: jax.Array) -> Batch:
        """The rows idx; their order need not keep the groups, so prompt_rows becomes 1."""
        return jax.tree.map(lambda x: x[idx], self).replace(prompt_rows=1)


def validate_batch(batch: Batch) -> None:
    """Shape and content checks that must fail before anything is compiled."""
    b, t = batch.tokens.shape
    for name in ("positions", "valid", "completion", "old_logps", "sampler_logps", "ref_logps"):
        arr = getattr(batch, name)
        if arr is not None and tuple(arr.shape) != (b, t):
            raise BadInputError(f"batch.{name} has shape {tuple(arr.shape)}, expected {(b, t)}")
    for name in ("pixels", "image_features"):
        arr = getattr(batch, name)
        if arr is not None and arr.shape[0] != b:
            raise BadInputError(f"batch.{name} has {arr.shape[0]} rows, expected {b}")
    if tuple(batch.advantages.shape) != (b,):
        raise BadInputError(f"batch.advantages has shape {tuple(batch.advantages.shape)}, expected {(b,)}")
    if not 1 <= batch.completion_start < t:
        raise BadInputError(f"completion_start must be in [1, {t}), got {batch.completion_start!r}")
    completion = to_host(batch.completion)
    if not completion.any():
        raise BadInputError("the batch has no completion tokens to train on")
    if completion[:, : batch.completion_start].any():
        raise BadInputError(
            f"completion tokens found before completion_start={batch.completion_start}; left-pad the prompts"
        )
    if not np.isfinite(to_host(batch.advantages)).all():
        raise BadInputError("advantages contain NaN or infinity")
    k, p = batch.prompt_rows, batch.completion_start
    if k < 1 or b % k:
        raise BadInputError(f"prompt_rows {k} does not divide the batch of {b} rows")
    if k > 1:  # the claim the shared-prompt forward rests on
        # (pixels, not a frozen tower's features of them: `VisionTrainer.prepare` checks them first)
        for name in ("tokens", "positions", "valid", "pixels"):
            x = getattr(batch, name)
            if x is None:
                continue
            x = to_host(x)
            x = (x[:, :p] if x.ndim == 2 else x).reshape(b // k, k, -1)
            if not (x == x[:, :1]).all():
                raise BadInputError(
                    f"batch.prompt_rows is {k} but rows of one run differ in {name} before the completion"
                )


class Trainer:
    """Jitted update and PPO driver for one model config and one training config."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainConfig,
        *,
        ref_params: Params | None = None,
        base: Params | None = None,
        donate: bool = False,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """mesh: the mesh the parameters and batches are placed on; only kernels that run per device
        (the TPU Pallas attention) need it, everything else is partitioned by XLA from the shardings.

        donate=True hands the state given to `update` over to XLA, which writes the new state into its
        buffers: one copy of the parameters and optimizer state less at the peak, and the old state must
        not be used again (nor any array that shares its buffers: pass a reference that is a copy).
        `train` donates; `grpo` donates a copy, because it keeps the state a step started from to roll
        an abandoned step back. Donating also keeps the kept malloc heap (mllmjax.runtime) at one
        update's size: without it every update allocates a whole new state, which splits the hole its
        temporaries left, and the heap grows over the first updates.

        base: with LoRA (cfg.lora.rank > 0), the frozen base params the adapters sit on; it is the KL
        reference too, so ref_params is not taken. Never donated."""
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.donate = donate
        self.mesh = mesh
        self.optimizer = make_optimizer(cfg.optim)
        self.schedule = cfg.optim.schedule()
        self.lora = cfg.lora if cfg.lora.enabled else None
        self.base = base if self.lora is not None else None
        if self.lora is not None:
            if base is None:
                raise BadInputError("LoRA training needs the base parameters")
            ref_params = base if cfg.loss.beta > 0 else None
        if cfg.loss.beta > 0:
            if ref_params is None:
                raise BadInputError("beta > 0 needs the reference parameters (the starting policy)")
            self.ref_params: Params | None = ref_params
        else:
            self.ref_params = None  # beta 0: keep no reference copy alive
        self._compute_dtype = jnp.dtype(cfg.compute_dtype) if cfg.compute_dtype else None
        self._remat = REMAT_POLICIES[cfg.remat]
        # The decoder the forward runs: the model, or a vision-language model's language model.
        self.text_cfg: ModelConfig = getattr(model_cfg, "text", model_cfg)
        # A model with layers of different parameters unrolls whatever layer_loop says (`transformer`).
        self._unroll = unrolls_layers(cfg.layer_loop, cfg.remat) or bool(self.text_cfg.layer_stacks())
        self._router = "router" in layer_specs(self.text_cfg)  # a mixture of experts: report router_aux
        self._update_jits: dict[Any, Any] = {}
        self._logprobs_jit = jax.jit(self._logprobs)
        self._grads_jit = jax.jit(self._grads, static_argnames=("micro_batch",))

    def logprobs(self, params: Params, batch: Batch) -> jax.Array:
        """Log-probs [B, T] of the batch under the policy of `params` (the adapters, with LoRA)."""
        return self._logprobs_jit(params, batch, self.base)

    def reference_logprobs(self, batch: Batch) -> jax.Array:
        """Log-probs [B, T] under the KL reference (with LoRA: the base, adapters off)."""
        return self._logprobs_jit(self.ref_params, batch, None)

    def grads(
        self, params: Params, batch: Batch, micro_batch: int | None = None
    ) -> tuple[Params, dict[str, jax.Array], jax.Array]:
        """The minibatch's summed gradient w.r.t. the trainable params (`_grads`), jitted."""
        return self._grads_jit(params, batch, self.base, micro_batch=micro_batch)

    # ----------------------------------------------------------------------------- state
    def init_state(self, params: Params, rng: jax.Array) -> TrainState:
        return TrainState(
            params=params,
            opt_state=self.optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jnp.asarray(rng, jnp.uint32),
        )

    # ----------------------------------------------------------------------------- pieces
    def _split(self, params: Params | None) -> Params | None:
        """params with the layers as per-layer trees when the forward unrolls them (else as given)."""
        if not self._unroll or params is None:
            return params
        return split_params(params, self.model_cfg)

    def _stack(self, grads: Params) -> Params:
        """The inverse of `_split`, for gradients."""
        if not self._unroll:
            return grads
        return join_params(grads, self.model_cfg)

    def _kernel(self, name: str) -> Kernel:
        """The attention kernel of the training forward, with the mesh axes of its rows and heads."""
        if self.mesh is None:
            return Kernel(name)
        return Kernel(name, self.mesh, mesh_axes(self.mesh, "batch"), mesh_axes(self.mesh, "heads"))

    def _forward_logprobs(
        self, params: Params, batch: Batch
    ) -> tuple[jax.Array, jax.Array | None, dict[str, jax.Array]]:
        """(log-probs [B, T], entropy [B, T], the blocks' summed aux outputs: a router's statistics).

        With shared_prompt and rows that share prompts (`batch.prompt_rows` > 1), each group's prompt is
        run once and its rows' completions attend to it (`transformer.fold_groups`); the log-probs are
        the per-row forward's, and the prompt's gradient is the sum of its rows'. A mixture of experts'
        router statistics then count a shared prompt's tokens once."""
        text = self._text_params(params)
        cdt = self._compute_dtype or text["embed"].dtype
        p, rows = batch.completion_start, batch.prompt_rows if self.cfg.shared_prompt else 1
        embeds, reach = self._input_embeds(params, batch, cdt), self._reach(batch)
        inputs = (batch.tokens if embeds is None else embeds, batch.positions, batch.valid, reach)
        shared = None
        if rows > 1:
            inputs = tuple(None if x is None else fold_groups(x, p, rows) for x in inputs)
            shared = (p, rows)
        hidden, _, aux = forward(
            text,
            self.text_cfg,
            None if embeds is not None else inputs[0],
            inputs[1],
            embeds=None if embeds is None else inputs[0],
            valid=inputs[2],
            compute_dtype=self._compute_dtype,
            remat=self._remat,
            kernel=self._kernel(resolve_attention(self.cfg.attention, cdt)),
            with_aux=True,
            shared=shared,
            reach=inputs[3],
        )
        targets, start = batch.tokens, p
        if rows > 1:  # each row's last prompt state and its completion's: [B, 1 + C, D]
            hidden, targets, start = unfold_groups(hidden, p, rows), batch.tokens[:, p - 1 :], 1
        logp, ent = sequence_logprobs(
            hidden,
            lm_head(text),
            targets,
            completion_start=start,
            temperature=self.cfg.temperature,
            chunk_size=self.cfg.logit_chunk,
            recompute=self.cfg.logit_recompute,
            softcap=self.text_cfg.final_logit_softcap,
            entropy_grad=self.cfg.loss.entropy_coef > 0,
        )
        if rows > 1:  # back to the batch's columns: 0 before the completion
            zeros = jnp.zeros((logp.shape[0], p - 1), jnp.float32)
            logp = jnp.concatenate([zeros, logp], axis=1)
            ent = None if ent is None else jnp.concatenate([zeros, ent], axis=1)
        return logp, ent, aux

    def _text_params(self, params: Params) -> Params:
        """The language model's params within the forward's params (all of them for a text model)."""
        return params

    def _input_embeds(self, params: Params, batch: Batch, dtype: Any) -> jax.Array | None:
        """The first layer's input [B, T, D] when it is not the tokens' embeddings (a vision-language
        model's, with image features in place), else None."""
        return None

    def _reach(self, batch: Batch) -> jax.Array | None:
        """How far ahead each token sees [B, T] (`transformer.forward(reach=)`), or None: causal."""
        return None

    def _policy(self, params: Params, base: Params | None, key: jax.Array | None = None) -> Params:
        """The params the forward runs: params itself, or with LoRA the base with the adapters attached
        (key: dropout's raw PRNG key, None for no dropout)."""
        if base is None:
            return params
        return attach(base, params, self.cfg.lora, self.model_cfg, key)

    def _logprobs(self, params: Params, batch: Batch, base: Params | None = None) -> jax.Array:
        """Log-probs [B, T] of the batch's tokens under params (0 before completion_start), no grad."""
        params, base = jax.lax.stop_gradient((params, base))
        logp, _, _ = self._forward_logprobs(self._policy(self._split(params), self._split(base)), batch)
        return logp

    def _micro_loss(
        self,
        params: Params,
        batch: Batch,
        weights: jax.Array,
        token_count: jax.Array,
        share: float,
        base: Params | None = None,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array]]:
        """The micro-batch's part of the minibatch loss; share: its fraction of the minibatch's rows."""
        logp, ent, aux = self._forward_logprobs(self._policy(params, base, key), batch)
        loss, metrics = grpo_loss(
            logp,
            batch.old_logps,
            batch.advantages,
            batch.completion,
            weights,
            self.cfg.loss,
            ref_logp=batch.ref_logps,
            sampler_logp=batch.sampler_logps,
            token_count=token_count,
            entropy=ent,
        )
        metrics["entropy"] = jax.lax.stop_gradient(jnp.sum(batch.completion * ent) / token_count)
        if self._router:
            router_aux = share * load_balancing_loss(aux)
            loss = loss + self.cfg.router_aux_coef * router_aux
            metrics["loss"] = loss
            metrics["router_aux"] = jax.lax.stop_gradient(router_aux)
        return loss, (metrics, jax.lax.stop_gradient(logp))

    def _grads(
        self,
        params: Params,
        batch: Batch,
        base: Params | None = None,
        micro_batch: int | None = None,
        key: jax.Array | None = None,
    ) -> tuple[Params, dict[str, jax.Array], jax.Array]:
        """Summed gradient of the minibatch loss over its micro-batches; (grads, metrics, logps [B, T]).
        With LoRA, params are the adapters and base the frozen weights; key: LoRA dropout's key."""
        b, t = batch.tokens.shape
        mb = b if micro_batch is None else micro_batch
        if b % mb:
            raise BadInputError(f"micro-batch size {mb} does not divide the minibatch size {b}")
        n = b // mb
        # A micro-batch of consecutive rows holds whole runs of this many rows of one prompt.
        batch = batch.replace(prompt_rows=math.gcd(batch.prompt_rows, mb))
        weights = aggregation_weights(batch.completion, self.cfg.loss, t - batch.completion_start)
        token_count = jnp.maximum(batch.completion.sum().astype(jnp.float32), 1.0)
        micro = jax.tree.map(lambda x: x.reshape(n, mb, *x.shape[1:]), (batch, weights))
        micro = (*micro, jnp.arange(n, dtype=jnp.uint32))
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)
        split = self._split(params)  # outside the grad: see blocks.cpu.split_layers
        split_base = self._split(base)
        use_dropout = key is not None and self.lora is not None and self.lora.dropout > 0

        def body(carry, xs):
            acc, metrics = carry
            mbatch, mweights, i = xs
            mkey = (
                jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key), i))
                if use_dropout
                else None
            )
            (_, (m, logp)), g = grad_fn(split, mbatch, mweights, token_count, mb / b, split_base, mkey)
            g = self._stack(g)
            acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)
            return (acc, combine_metrics(metrics, m)), logp

        zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zero_metrics = {
            k: jnp.zeros((), jnp.float32)
            for k in ("loss", "policy_loss", "kl", "entropy", "clip_low", "clip_high", "ratio_mean")
        }
        if self._router:
            zero_metrics["router_aux"] = jnp.zeros((), jnp.float32)
        if self.cfg.loss.entropy_coef > 0:
            zero_metrics["entropy_loss"] = jnp.zeros((), jnp.float32)
        zero_metrics["ratio_min"] = jnp.array(jnp.inf, jnp.float32)
        zero_metrics["ratio_max"] = jnp.array(-jnp.inf, jnp.float32)
        if batch.sampler_logps is not None:
            zero_metrics["logp_mismatch_mean"] = jnp.zeros((), jnp.float32)
            zero_metrics["logp_mismatch_max"] = jnp.zeros((), jnp.float32)
        (grads, metrics), logps = jax.lax.scan(body, (zero_grads, zero_metrics), micro)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        metrics["tokens"] = token_count
        return grads, metrics, logps.reshape(b, t)

    def _update(
        self, state: TrainState, batch: Batch, base: Params | None = None
    ) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
        """One optimizer update from one minibatch; returns (state, metrics, log-probs before it)."""
        key = None
        if self.lora is not None and self.lora.dropout > 0:
            key = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))
        grads, metrics, logps = self._grads(state.params, batch, base, self.cfg.micro_batch, key)
        metrics["grad_norm"] = jnp.sqrt(
            sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
        )
        metrics["lr"] = self.schedule(state.step)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics, logps

    def update(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
        """Jitted `_update` whose new state keeps the placement of the state it was given.

        Left to itself XLA may hand back a parameter with a different (equally valid) sharding than it
        came in with, and the next call would then compile again; pinning the outputs to the inputs'
        NamedShardings keeps one program per placement. A state placed otherwise than the states the
        updates return made the second update compile its program again, so the state is first placed
        as they are (`_as_returned`).
        """
        state = self._as_returned(state)
        leaves, treedef = jax.tree.flatten(state)
        pins = tuple(
            x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) else None for x in leaves
        )
        key = (treedef, pins)
        fn = self._update_jits.get(key)
        if fn is None:

            def pinned(state: TrainState, batch: Batch, base: Params | None):
                new, metrics, logps = self._update(state, batch, base)
                out = [
                    x if pin is None else jax.lax.with_sharding_constraint(x, pin)
                    for x, pin in zip(jax.tree.leaves(new), pins, strict=True)
                ]
                return jax.tree.unflatten(treedef, out), metrics, logps

            fn = self._update_jits[key] = jax.jit(pinned, donate_argnums=(0,) if self.donate else ())
        return fn(state, batch, self.base)

    def _as_returned(self, state: TrainState) -> TrainState:
        """`state` placed as an update returns its state: a NamedSharding's spec without trailing
        Nones (the same placement: no copy), and leaves placed on no mesh (a fresh state's update count
        and RNG, the optimizer's step count) replicated over the trainer's mesh, or the mesh the other
        leaves are on, where it holds only this process's devices (across processes they are left as
        they are). On no mesh, leaves made on no device are committed to the device of those that are
        (a loaded checkpoint's params beside a fresh update count), as the updates return them."""
        mesh = self.mesh
        if mesh is None:
            mesh = next(
                (
                    x.sharding.mesh
                    for x in jax.tree.leaves(state)
                    if isinstance(getattr(x, "sharding", None), NamedSharding)
                ),
                None,
            )
        everywhere = None
        if mesh is not None and not mesh.is_multi_process:
            everywhere = NamedSharding(mesh, PartitionSpec())
        elif mesh is None:  # one device: commit the leaves made on no device where others are committed
            everywhere = next(
                (x.sharding for x in jax.tree.leaves(state) if getattr(x, "committed", False)), None
            )

        def place(x: Any) -> Any:
            sharding = getattr(x, "sharding", None)
            if isinstance(sharding, NamedSharding):
                spec = tuple(sharding.spec)
                while spec and spec[-1] is None:
                    spec = spec[:-1]
                if len(spec) == len(sharding.spec):
                    return x
                return jax.device_put(
                    x, NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)
                )
            if everywhere is None or not isinstance(x, jax.Array) or (mesh is None and x.committed):
                return x
            return jax.device_put(x, everywhere)

        return jax.tree.map(place, state)

    # ----------------------------------------------------------------------------- driver
    def train_on_batch(
        self,
        state: TrainState,
        batch: Batch,
        on_update: Callable[[dict[str, float]], None] | None = None,
        timings: dict[str, float] | None = None,
    ) -> tuple[TrainState, list[dict[str, float]]]:
        """PPO epochs x minibatches of updates on one batch; returns (state, metrics per update).
        on_update(metrics) is called after each update (for progress displays); `timings`, if given,
        receives the seconds spent on the reference log-probs (`ref_logps_s`)."""
        validate_batch(batch)
        signal_point("update")
        cfg = self.cfg
        b = batch.size
        if b % cfg.minibatches:
            raise BadInputError(f"{cfg.minibatches} minibatches do not divide the batch of {b} rows")
        rows = b // cfg.minibatches
        if cfg.micro_batch is not None and rows % cfg.micro_batch:
            raise BadInputError(
                f"micro-batch size {cfg.micro_batch} does not divide the minibatch of {rows} rows"
            )
        if self.ref_params is not None:
            start = time.perf_counter()
            batch = batch.replace(ref_logps=jax.block_until_ready(self.reference_logprobs(batch)))
            if timings is not None:
                timings["ref_logps_s"] = time.perf_counter() - start
        old = batch.old_logps
        history: list[dict[str, float]] = []
        for epoch in range(cfg.ppo_epochs):
            rng, sub = jax.random.split(state.rng)
            state = state.replace(rng=rng)
            # Rows are shuffled in runs of `unit` rows of one prompt, which stay together and in order.
            unit = math.gcd(batch.prompt_rows, rows)
            order = jnp.arange(b)
            if cfg.shuffle:
                runs = jax.random.permutation(sub, b // unit)
                order = (runs[:, None] * unit + jnp.arange(unit)).reshape(-1)
            recorded = jnp.zeros(batch.tokens.shape, jnp.float32) if old is None else None
            for i in range(cfg.minibatches):
                idx = order[i * rows : (i + 1) * rows]
                mini = batch.rows(idx).replace(old_logps=None if old is None else old[idx], prompt_rows=unit)
                start = time.perf_counter()
                state, metrics, logps = self.update(state, mini)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                metrics["seconds"] = time.perf_counter() - start
                metrics["tokens_per_s"] = metrics["tokens"] / max(metrics["seconds"], 1e-9)
                metrics["epoch"] = float(epoch)
                history.append(metrics)
                if on_update is not None:
                    on_update(metrics)
                if recorded is not None:
                    recorded = recorded.at[idx].set(logps)
            if recorded is not None:
                old = recorded
        return state, history
