"""How much device memory a run needs, worked out from shapes before anything is loaded.

Design decisions:
- The estimate is per device, on paper: parameter bytes follow the same sharding rules that place the
  parameters (`mllmjax.sharding`), so a 7B model on `fsdp=8` counts one eighth of most tensors; batch
  rows are split over the data-parallel axes (data x fsdp) like the batch is.
- Training counts the parameters, the float32 gradient accumulator plus one micro-batch's gradient,
  the optimizer slots (Lion 1, AdamW 2, in the parameter dtype, as optax keeps them), the frozen
  reference copy when beta > 0, the new parameters and optimizer state the update returns (unless the
  old ones are donated, as `train` does; grpo keeps them to roll a step back), and the activations one
  micro-batch keeps for the backward pass under the remat policy (see `_saved_per_token_layer`), plus
  the chunked LM-head logits.
- A mixture of experts keeps, per token and layer, its k top-k rows (padded to whole blocks, at most
  1.25 k x D) and the k expert outputs instead of an MLP's 3 F, and one layer at a time holds an
  "experts" workspace: the float32 gradient accumulators of the layer's experts (the loop form), or
  every block's gathered weights and their gradients (the blocks form, `blocks.moe`), plus the
  layer's experts gathered whole on each device when the experts are sharded.
- Sampling counts the parameters, the KV cache (keys and values of every layer for every row and
  slot, in the compute dtype; a sliding-window layer's ring holds min(W, length) slots) and the
  last-token logits of every row.
- Available memory is the device's own limit (`memory_stats()['bytes_limit']` on GPU/TPU); on the CPU,
  where the fake devices share the host, it is MemAvailable split over the local devices.
- On the CPU the devices are the host, so `with_process` adds what the process holds besides arrays
  ("runtime": the libraries, XLA's runtime and programs, Python objects, the tokenizer and data, read
  from its resident memory when the estimate is made) and counts that memory as available too.
- Commands print the estimate before a training run starts and stop with one line if it cannot fit
  (exit 2, nothing written). It is an estimate: XLA's own buffer assignment (which
  `tests/test_memory.py` compares it with) decides the real peak, so a run within ~10% of the limit
  may still fail, and a user who knows better sets `MLLMJAX_MEMORY_CHECK=0` to skip the check.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from mllmjax.errors import BadInputError
from mllmjax.models.blocks.attention import causal_blocks
from mllmjax.models.blocks.cpu import input_dims
from mllmjax.models.blocks.moe import PAD_FRACTION, block_rows, gathered_bytes, num_blocks, resolve_impl
from mllmjax.models.cache import cache_window
from mllmjax.models.config import ModelConfig
from mllmjax.models.params import ParamSpec, map_specs
from mllmjax.sharding import DEFAULT_RULES, _as_tuple

GB = 1e9
_OPTIMIZER_SLOTS = {"lion": 1, "adamw": 2}


def _dtype_bytes(dtype: Any) -> int:
    return int(np.dtype(str(dtype)).itemsize) if str(dtype) != "bfloat16" else 2


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by part; `available` is the per-device limit (None when unknown)."""

    parts: dict[str, int]
    available: int | None

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self, label: str | None = None) -> str:
        """One line: 'memory per device[, label]: params 0.54 GB + ... = 1.90 GB of 12.3 GB available'."""
        body = " + ".join(f"{k} {_size(v)}" for k, v in self.parts.items() if v)
        avail = f" of {self.available / GB:.1f} GB available" if self.available else ""
        head = f"memory per device, {label}" if label else "memory per device"
        return f"{head}: {body} = {_size(self.total)}{avail}"

    def check(self, hint: str) -> None:
        """Raise BadInputError when the estimate exceeds the available memory (MLLMJAX_MEMORY_CHECK=0: never)."""
        if os.environ.get("MLLMJAX_MEMORY_CHECK", "1") == "0":
            return
        if self.available is not None and self.total > self.available:
            raise BadInputError(
                f"this run needs about {self.total / GB:.1f} GB per device "
                f"({', '.join(f'{k} {v / GB:.1f}' for k, v in self.parts.items() if v)}) but "
                f"{self.available / GB:.1f} GB is available; {hint}"
            )


def _mesh_sizes(mesh: Any) -> dict[str, int]:
    if mesh is None:
        return {}
    if isinstance(mesh, Mapping):
        return {str(k): int(v) for k, v in mesh.items()}
    return {str(k): int(v) for k, v in mesh.shape.items()}


def param_bytes_per_device(
    cfg: ModelConfig,
    dtype: Any,
    mesh: Any = None,
    only: Callable[[str], bool] | None = None,
    specs: Any = None,
) -> int:
    """Bytes of the parameters one device holds under the default sharding rules (the same
    `ShardingRules.spec` that places them, applied to axis sizes alone); `only` picks params by
    path ("layers/q", "embed", ...); specs: another spec tree than the model's (LoRA adapters')."""
    sizes = _mesh_sizes(mesh)
    axis_sizes = SimpleNamespace(shape=sizes)  # all `spec` reads of a mesh
    counts: list[int] = []

    def count(path: str, spec: ParamSpec) -> None:
        if only is not None and not only(path):
            return
        shape, logical = spec
        parts = DEFAULT_RULES.spec(shape, logical, axis_sizes)
        counts.append(
            math.prod(
                dim // math.prod(sizes[a] for a in _as_tuple(p)) for dim, p in zip(shape, parts, strict=True)
            )
        )

    map_specs(count, cfg.param_specs() if specs is None else specs)
    return sum(counts) * _dtype_bytes(dtype)


def _rows_per_device(rows: int, sizes: Mapping[str, int]) -> int:
    dp = sizes.get("data", 1) * sizes.get("fsdp", 1) * sizes.get("expert", 1)
    return rows // dp if rows % dp == 0 else rows  # an uneven batch is replicated


def _experts(cfg: ModelConfig) -> tuple[int, int, int] | None:
    """(experts, top-k, expert width) of a mixture-of-experts config, None for a dense one."""
    specs = cfg.param_specs()
    stack = next((s for s in ("layers", *cfg.layer_stacks()) if "experts_gate" in specs[s]), None)
    if stack is None:
        return None
    _, e, _, f = specs[stack]["experts_gate"].shape
    return e, int(cfg.num_experts_per_tok), f


def _mlp_saved(cfg: ModelConfig, compute_bytes: int, remat: str, tensor: int) -> float:
    """Bytes one token's MLP keeps for the backward pass. Dense: gate, up and their product (3 F), or
    with a dots policy the gate, up and down outputs (2 F + D). Mixture of experts: its rows (at most
    k (1 + 1 / PAD_FRACTION) D: a block's padding), the k expert outputs the weighted sum reads (k D),
    the router logits (E) and the float32 router probabilities (2 x 4 E with the top-k's); with a dots
    policy the router logits only (the grouped products are recomputed inside their custom VJP); in
    the layer `nothing_saveable` recomputes, the rows and the router (the expert outputs are consumed
    by the weighted sum's backward first). A model with dense MLPs among its expert layers
    (`ModelConfig.layer_stacks`): the larger of the two, for every layer."""
    f = cfg.intermediate_size // tensor
    dense = compute_bytes * (2 * f + cfg.hidden_size if remat.startswith("dots") else 3 * f)
    moe = _experts(cfg)
    if moe is None:
        return dense
    e, k, _ = moe
    if cfg.layer_stacks():
        return max(dense, _mlp_saved(dataclasses.replace(cfg, decoder_sparse_step=1, mlp_only_layers=()),
                                     compute_bytes, remat, tensor))  # fmt: skip
    rows = k * (1 + 1 / PAD_FRACTION) * cfg.hidden_size
    if remat.startswith("dots"):
        return compute_bytes * e
    outputs = 0 if remat == "recomputed" else k * cfg.hidden_size
    return compute_bytes * (rows + outputs + e) + 8 * e


def _saved_per_token_layer(
    cfg: ModelConfig, seq: int, compute_bytes: int, remat: str, tensor: int, keys: float | None = None
) -> float:
    """Bytes one token keeps per layer for the backward pass.

    remat none: the layer input and both norm outputs (3 D), q/k/v after and before RoPE
    (2 (N + 2K) H), the attention output (N H), the residual after attention (D), the MLP's
    (`_mlp_saved`: gate, up and their product, 3 F) in the compute dtype, plus the float32 attention
    scores, masked scores and probabilities (3 N S, S the keys a query's causal block reads, or `keys`).
    dots_saveable / dots_with_no_batch_dims_saveable: the matmul outputs only (q, k, v, o, gate, up,
    down, and the scores). nothing_saveable: the layer input only (the layer is recomputed).
    "recomputed": what the one layer being recomputed during its backward holds at once under
    nothing_saveable: as none, less the q/k/v before RoPE, dead by then (RoPE's backward needs only
    cos/sin, the projections' only their input).
    """
    d, h = cfg.hidden_size, cfg.head_dim
    n, k = max(1, cfg.num_heads // tensor), max(1, cfg.num_kv_heads // tensor)
    blocks = causal_blocks(seq)  # the keys a query's block reads: (blocks + 1) / (2 blocks) of seq
    keys = seq * (blocks + 1) / (2 * blocks) if keys is None else keys
    scores = 4 * 3 * n * keys
    mlp = _mlp_saved(cfg, compute_bytes, remat, tensor)
    if remat == "nothing_saveable":
        return compute_bytes * d
    if remat in ("dots_saveable", "dots_with_no_batch_dims_saveable"):
        return compute_bytes * ((n + 2 * k) * h + d + d) + mlp + 4 * n * keys
    pre_rope = compute_bytes * (n + 2 * k) * h if remat == "recomputed" else 0
    return compute_bytes * (3 * d + 2 * (n + 2 * k) * h + n * h + d) + mlp + scores - pre_rope


def _experts_workspace(
    cfg: ModelConfig, tokens: int, compute_bytes: int, sizes: Mapping[str, int], backend: str | None
) -> int:
    """Bytes one layer's mixture of experts holds at once in its backward pass, for `tokens` tokens
    (the micro-batch: the dispatch sorts all of them): the cotangents of its rows (twice: the grouped
    product's and the gather's) and of the expert outputs, its float32 weight-gradient accumulators,
    and in the blocks form every block's gathered weights and their float32 gradients; plus the
    layer's experts gathered whole (in the compute dtype) when they are sharded. 0 for a dense model."""
    moe = _experts(cfg)
    if moe is None:
        return 0
    e, k, f = moe
    d = cfg.hidden_size
    matrices = 3 * d * f  # one expert's gate, up and down
    form = resolve_impl(
        getattr(cfg, "moe_impl", "auto"), gathered_bytes(tokens, k, e, d, f, compute_bytes), backend
    )
    rows = k * (1 + 1 / PAD_FRACTION)
    work = int(tokens * compute_bytes * (2 * rows + k) * d) + 4 * e * matrices
    if form == "blocks":
        pairs = tokens * k
        work += num_blocks(pairs, e, block_rows(pairs, e)) * matrices * (compute_bytes + 4)
    experts = lambda path: "/experts_" in path  # noqa: E731
    sparse = len(cfg.layer_stacks().get("moe_layers", range(cfg.num_layers)))  # layers with experts
    if param_bytes_per_device(cfg, "uint8", sizes, only=experts) < sparse * e * matrices:
        work += e * matrices * compute_bytes  # sharded: gathered whole for the layer
    return work


def estimate_training(
    cfg: ModelConfig,
    *,
    rows: int,
    seq_len: int,
    param_dtype: Any = "float32",
    compute_dtype: Any = None,
    optimizer: str = "lion",
    beta: float = 0.0,
    micro_batch: int | None = None,
    remat: str = "none",
    logit_chunk: int = 256,
    logit_recompute: bool | None = None,
    completion_len: int | None = None,
    mesh: Any = None,
    available: int | None = None,
    donated: bool = False,
    backend: str | None = None,
    lora: Any = None,
    prompt_rows: int = 1,
) -> MemoryEstimate:
    """Per-device memory of one optimizer update on `rows` sequences of `seq_len` tokens, of which the
    last `completion_len` (default all) go through the LM head; prompt_rows: runs of this many rows
    share their prompt (the first seq_len - completion_len tokens), which the shared-prompt forward
    runs once per micro-batch's part of the run (`Trainer._forward_logprobs`); donated: the update
    writes the new state into the old one's buffers (`Trainer(donate=True)`). backend: where it runs ("cpu", "gpu",
    "tpu"; default this process's), which picks a mixture of experts' grouped-matmul form.

    lora: a `mllmjax.lora.LoraConfig` with rank > 0: the params are the frozen base plus float32
    adapters ("adapters"), and gradients, optimizer state and the new state are the adapters'; the
    base is the KL reference, so no reference copy. With dropout, each adapter's dropped input is
    saved for the backward (tokens x its input width per target and layer).

    A model whose layers differ in their parameters (`ModelConfig.layer_stacks`) runs them unrolled,
    where a remat policy leaves XLA free to schedule every layer's recomputation at once: measured on
    the CPU, its peak under nothing_saveable or dots_saveable is the peak without remat, so that is
    what is estimated."""
    if cfg.layer_stacks():
        remat = "none"
    sizes = _mesh_sizes(mesh)
    tensor = sizes.get("tensor", 1)
    params = param_bytes_per_device(cfg, param_dtype, sizes)
    p_bytes = _dtype_bytes(param_dtype)
    c_bytes = _dtype_bytes(compute_dtype or param_dtype)
    n_param = params // p_bytes
    micro_rows = _rows_per_device(micro_batch or rows, sizes)
    tokens = micro_rows * seq_len
    # (tokens, their sequence length, the keys a query reads) of each kind of token in a micro-batch
    kinds: list[tuple[float, int, float | None]] = [(tokens, seq_len, None)]
    shared = math.gcd(prompt_rows, micro_batch or rows)
    if shared > 1 and completion_len is not None:
        # Each prompt once per `shared` rows (self-attention); each completion reads the prompt and its
        # own keys up to its query block's end (`attention_shared_prompt`).
        prompt, blocks = seq_len - completion_len, causal_blocks(completion_len)
        completion_keys = prompt + completion_len * (blocks + 1) / (2 * blocks)
        kinds = [(-(-micro_rows // shared) * prompt, prompt, None),
                 (micro_rows * completion_len, seq_len, completion_keys)]  # fmt: skip
        tokens = sum(n for n, _, _ in kinds)

    def layer(kind: str) -> float:  # bytes the micro-batch's tokens keep per layer under remat `kind`
        return sum(n * _saved_per_token_layer(cfg, t, c_bytes, kind, tensor, k) for n, t, k in kinds)

    activations = cfg.num_layers * layer(remat)
    recomputed = 0
    if remat == "nothing_saveable":  # one layer is recomputed during its backward
        recomputed = layer("recomputed")
        activations += recomputed
    vocab = cfg.vocab_size // tensor if cfg.vocab_size % tensor == 0 else cfg.vocab_size
    scored = micro_rows * (completion_len or seq_len)  # positions through the LM head
    logits = 3 * 4 * min(logit_chunk, scored) * vocab  # one chunk's logits, softmax and gradient
    # The softmax kept for the backward (loss.keeps_softmax, which decides on the whole micro-batch).
    from mllmjax.loss import keeps_softmax

    global_scored = (micro_batch or rows) * (completion_len or seq_len)
    if keeps_softmax(global_scored, cfg.vocab_size, logit_recompute):
        logits += 4 * scored * vocab
    # The LM head's backward frees its logits and softmax before the layers' backward, where a
    # recomputed layer lives: only the larger of the two adds to the peak.
    logits = max(0, logits - recomputed)
    if lora is not None and lora.enabled:
        return _lora_training(
            cfg, lora, sizes, params, activations, logits, optimizer, donated,
            tokens, c_bytes, _experts_workspace(cfg, (micro_batch or rows) * seq_len, c_bytes, sizes, backend),
            mesh, available,
        )  # fmt: skip
    slots = _OPTIMIZER_SLOTS.get(optimizer, 2) * params
    parts = {
        "params": params,
        "grads": n_param * (4 + p_bytes),  # float32 accumulator + one micro-batch's gradient
        "optimizer": slots,
        "reference": params if beta > 0 else 0,
        # The update returns a new state while the one it was given is still alive, unless donated.
        "new state": 0 if donated else params + slots,
        "activations": int(activations),
        "logits": int(logits),
        "experts": _experts_workspace(cfg, (micro_batch or rows) * seq_len, c_bytes, sizes, backend),
    }
    return MemoryEstimate(parts, available)


def vision_language_bytes(
    cfg: Any,
    trained: Sequence[str],
    *,
    param_dtype: Any,
    optimizer: str,
    beta: float,
    mesh: Any = None,
    donated: bool = False,
) -> tuple[int, int]:
    """(bytes per device alive during a rollout, during an update) of a vision-language model's tower
    and projector, which its language model's estimate leaves out. A frozen part is its params; a
    trained one (`trained`: part names) also has, as `estimate_training` counts them, optimizer slots
    and with beta > 0 the reference copy at all times, and during an update a float32 accumulator plus
    one micro-batch's gradient and the new state. Their activations are not counted: the tower runs
    once per batch outside the gradient when frozen, and the projector's are one image's tokens wide."""
    sizes = _mesh_sizes(mesh)
    specs = cfg.param_specs()
    frozen = trained_bytes = 0
    for part in ("vision", "projector"):
        n = param_bytes_per_device(cfg, param_dtype, sizes, specs=specs[part])
        if part in trained:
            trained_bytes += n
        else:
            frozen += n
    p_bytes = _dtype_bytes(param_dtype)
    slots = _OPTIMIZER_SLOTS.get(optimizer, 2) * trained_bytes
    alive = frozen + trained_bytes + slots + (trained_bytes if beta > 0 else 0)
    grads = trained_bytes // p_bytes * (4 + p_bytes)
    return alive, alive + grads + (0 if donated else trained_bytes + slots)


def _lora_training(
    cfg: ModelConfig, lcfg: Any, sizes: Mapping[str, int], params: int, activations: float, logits: float,
    optimizer: str, donated: bool, tokens: int, c_bytes: int, experts: int, mesh: Any, available: int | None,
) -> MemoryEstimate:  # fmt: skip
    """`estimate_training`'s parts for LoRA: the adapters carry the trained state."""
    from mllmjax.lora import EXPERT_TARGETS, adapter_specs

    specs = adapter_specs(cfg, lcfg)
    adapters = param_bytes_per_device(cfg, "float32", mesh, specs=specs)
    slots = _OPTIMIZER_SLOTS.get(optimizer, 2) * adapters
    layer = cfg.param_specs()["layers"]
    dropped = 0
    if lcfg.dropout > 0:  # dropout(x) of each target, saved per layer for the adapters' backward
        for name in specs["layers"]:
            a = specs["layers"][name]["a"]
            dropped += math.prod(a.shape[1:-1])
        dropped = tokens * dropped * c_bytes
    merged = 0
    if any(t in specs["layers"] for t in EXPERT_TARGETS):  # one layer's experts merged at a time (x2: grad)
        names = {f"layers/{t}" for t in EXPERT_TARGETS if t in layer}
        merged = 2 * param_bytes_per_device(cfg, "float32", mesh, only=names.__contains__) // cfg.num_layers
    parts = {
        "params": params,
        "adapters": adapters,
        "grads": adapters * 2,  # float32 accumulator + one micro-batch's gradient
        "optimizer": slots,
        "reference": 0,  # the base, adapters off
        "new state": 0 if donated else adapters + slots,
        "activations": int(activations + dropped + merged),
        "logits": int(logits),
        "experts": experts,
    }
    return MemoryEstimate(parts, available)


def estimate_sampling(
    cfg: ModelConfig,
    *,
    rows: int,
    cache_len: int | Sequence[int],
    param_dtype: Any = "float32",
    compute_dtype: Any = None,
    mesh: Any = None,
    available: int | None = None,
    out_major: bool = False,
) -> MemoryEstimate:
    """Per-device memory of decoding `rows` rows with a `cache_len`-slot KV cache.

    cache_len may be the windows a run's cache grows through (`sampling.sampler.decode_windows`):
    growing from one window to the next holds both, so the peak is the largest such pair.
    out_major: the decode loop works on an output-major copy of the layer matrices (the sampler's
    unrolled CPU path, `blocks.cpu.out_major_layer`), counted as "decode_weights".
    """
    lengths = [cache_len] if isinstance(cache_len, int) else list(cache_len)
    # Slots over all layers at each window; growing from one window to the next holds both.
    slots = [_kv_slots(cfg, n) for n in lengths]
    peak = max([slots[0]] + [a + b for a, b in zip(slots[:-1], slots[1:], strict=True)])
    sizes = _mesh_sizes(mesh)
    tensor = sizes.get("tensor", 1)
    kv = cfg.num_kv_heads // tensor if cfg.num_kv_heads % tensor == 0 else cfg.num_kv_heads
    r = _rows_per_device(rows, sizes)
    c_bytes = _dtype_bytes(compute_dtype or param_dtype)
    parts = {
        "params": param_bytes_per_device(cfg, param_dtype, sizes),
        "kv_cache": 2 * r * peak * kv * cfg.head_dim * c_bytes,
        "logits": 3 * 4 * r * cfg.vocab_size,
    }
    if out_major:
        specs = cfg.param_specs()
        names = {
            f"{stack}/{n}"
            for stack in ("layers", *cfg.layer_stacks())
            for n, s in specs[stack].items()
            if input_dims(ParamSpec(s.shape[1:], s.axes[1:]))
        }
        parts["decode_weights"] = param_bytes_per_device(cfg, param_dtype, sizes, only=names.__contains__)
    elif cache_window(cfg) is not None or cfg.layer_stacks():  # layers sliced once (`decode_params`)
        stacks = ("layers", *cfg.layer_stacks())
        is_layer = lambda path: path.split("/", 1)[0] in stacks  # noqa: E731
        parts["decode_weights"] = param_bytes_per_device(cfg, param_dtype, sizes, only=is_layer)
    return MemoryEstimate(parts, available)


def _kv_slots(cfg: ModelConfig, length: int) -> int:
    """Cache slots of all layers together for a `length`-slot cache: a windowed layer keeps a ring of
    min(W, length) slots (`models.cache`), every other layer `length`."""
    return sum(length if w is None else min(w, length) for w in cfg.layer_windows())


def available_bytes(devices: Any = None) -> int | None:
    """Per-device memory limit: the accelerator's own, or the host's MemAvailable over local devices."""
    import jax

    devices = (
        [d for d in devices if d.process_index == jax.process_index()] if devices else jax.local_devices()
    )
    stats = devices[0].memory_stats() if devices else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, len(devices))
    except OSError:
        pass
    return None


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def with_process(estimate: MemoryEstimate, alive: Any = None) -> MemoryEstimate:
    """On the CPU backend: `estimate` plus the process's resident memory now beyond the arrays of
    `alive` (already counted by the estimate) as "runtime", with that resident memory added to the
    available memory (MemAvailable leaves out what the process holds); both per local device, as the
    rest. Unchanged on accelerators, whose memory holds only arrays, or where /proc is missing."""
    import jax

    resident = _resident_bytes()
    if jax.default_backend() != "cpu" or resident is None:
        return estimate
    arrays = sum(
        shard.data.nbytes
        for x in jax.tree.leaves(alive)
        if isinstance(x, jax.Array)
        for shard in x.addressable_shards
    )  # replicated arrays keep a copy per (fake) device
    devices = jax.local_device_count()
    parts = {**estimate.parts, "runtime": max(0, resident - arrays) // devices}
    available = estimate.available + resident // devices if estimate.available is not None else None
    return MemoryEstimate(parts, available)


TRAIN_HINT = (
    "use a smaller --micro-batch, --remat nothing_saveable, more devices on the fsdp axis of --mesh, "
    "or MLLMJAX_MEMORY_CHECK=0 to try anyway"
)


def for_train_config(
    cfg: ModelConfig,
    train_cfg: Any,
    *,
    rows: int,
    seq_len: int,
    param_dtype: Any,
    mesh: Any,
    donated: bool = False,
    completion_len: int | None = None,
    prompt_rows: int = 1,
) -> MemoryEstimate:
    """The estimate of one update of `mllmjax.trainer.TrainConfig` on a minibatch of `rows` rows, runs
    of `prompt_rows` of which share a prompt (counted when the config runs shared prompts once)."""
    return estimate_training(
        cfg,
        rows=rows,
        seq_len=seq_len,
        param_dtype=param_dtype,
        compute_dtype=train_cfg.compute_dtype,
        optimizer=train_cfg.optim.name,
        beta=train_cfg.loss.beta,
        micro_batch=train_cfg.micro_batch,
        remat=train_cfg.remat,
        logit_chunk=train_cfg.logit_chunk,
        logit_recompute=train_cfg.logit_recompute,
        completion_len=completion_len,
        mesh=mesh,
        available=available_bytes(list(mesh.devices.flat)) if mesh is not None else available_bytes(),
        donated=donated,
        lora=getattr(train_cfg, "lora", None),
        prompt_rows=prompt_rows if getattr(train_cfg, "shared_prompt", False) else 1,
    )
