"""Every user-facing setting, declared once: its default beside its help.

`Settings` is flat and named like the CLI flags (with underscores). The stage configs (`RolloutConfig`,
`ScoreConfig`, `TrainConfig`, `LossConfig`, `OptimConfig`) take their defaults from `DEFAULTS`,
`GRPOConfig` adds the device settings and validates a whole run, and the CLI derives each command's
options from these fields (`mllmjax_cli.flags`), so a new flag is one line here (plus the code that
reads it).

No import of the library: the reward worker processes and `mllmjax --help` import this module and must
not load JAX. The device settings live on `GRPOConfig`; the mesh axes and the default mesh, plain
strings, are declared here (and re-exported by `mllmjax.sharding`) so that declaring them loads no JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MESH_AXES = ("data", "fsdp", "expert", "tensor")
DEFAULT_MESH = "data=1,fsdp=-1,tensor=1"


def setting(default: Any, help: str) -> Any:
    """A dataclass field with its default and the help its command-line flag shows."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """The settings the commands share, unvalidated: each stage config checks the values it takes."""

    # What to train and on what.
    model: str = setting(
        "smollm2-135m",
        "Checkpoint, hub id, HF folder, .gguf or smollm2-135m (converted into a cache on first use).",
    )
    data: str = setting(
        "gsm8k", "gsm8k, a hub id owner/name[:config], a .jsonl/.parquet file, or builtin:TASK (offline)."
    )
    split: str = setting("train", "Dataset split.")
    question_field: str | None = setting(None, "Record field holding the question (default: question).")
    answer_field: str | None = setting(None, "Record field holding the gold answer (default: answer).")
    system_prompt: str | None = setting(None, "File whose text replaces the built-in system prompt.")
    # The loop.
    steps: int = setting(400, "GRPO steps.")
    prompts_per_step: int = setting(1, "Prompts (groups) per step.")
    seed: int = setting(0, "Random seed; runs are deterministic for a seed.")
    # Rollout.
    group_size: int = setting(16, "Completions per prompt (one group).")
    max_new_tokens: int = setting(1024, "Most new tokens per completion.")
    temperature: float = setting(1.0, "Sampling temperature; 0 = greedy.")
    top_k: int = setting(50, "Keep the k most probable tokens; 0 = off.")
    top_p: float = setting(1.0, "Nucleus: keep the top probability mass p; 1 = off.")
    min_p: float = setting(0.0, "Drop tokens below p x the top probability; 0 = off.")
    batch_size: int = setting(
        64,
        "Most rows (prompts x samples) decoded at once; grpo --dynamic-sampling samples as many prompts "
        "per round as fill it.",
    )
    # Score.
    reward: str = setting(
        "correct=1.0,format=0.5,tags=0.5", "Rewards and weights, name=weight comma-separated."
    )
    reward_fn: tuple[str, ...] = setting(
        (), "A custom reward package.module:function[=weight] (weight 1 by default); repeatable."
    )
    reward_timeout: float = setting(
        5.0,
        "Seconds each custom reward call may run; one that runs longer scores 0 and is listed in "
        "reward_errors (the limit interrupts Python code, not a C extension that never returns to it).",
    )
    advantage: str = setting(
        "grpo",
        "Advantage estimator: grpo, dr_grpo, rloo, reinforce, reinforce_pp (REINFORCE++: group mean "
        "removed, then a batch z-score), grpo_clip2.",
    )
    overlong: str = setting(
        "none",
        "Long completions: none; mask (cut ones get advantage 0); penalty (cut ones: reward -= "
        "--overlong-penalty); soft:L_MAX,L_CACHE (DAPO: reward -= --overlong-penalty x (n - (L_MAX - "
        "L_CACHE)) / L_CACHE for n tokens past L_MAX - L_CACHE, capped at 1; grpo also takes soft:L_CACHE "
        "with L_MAX = --max-new-tokens).",
    )
    overlong_penalty: float = setting(1.0, "Size of the --overlong penalty (and the scale of soft's).")
    dynamic_sampling: bool = setting(
        False, "Sample more prompts until every group in the batch has varying rewards."
    )
    max_sampling_rounds: int = setting(4, "Most sampling rounds per step with --dynamic-sampling.")
    probe: bool = setting(
        True,
        "Before the first step of a run on another model or data than the embedded default's, sample up to "
        "8 prompts x G and warn when no group's rewards differ: GRPO would have nothing to learn from.",
    )
    estimator_switch: str | None = setting(
        None,
        "entropy<T: after a step whose policy entropy fell below T (nats per token), sample "
        "prompts-per-step x G prompts x 1 completion and score them with reinforce; otherwise prompts x G "
        "with --advantage. Off by default.",
    )
    replay_prob: float = setting(
        0.0,
        "Replay buffer: the probability that a step's prompt is replaced by a continuation of a partial "
        "completion stored from an earlier step (0 = off).",
    )
    replay_size: int = setting(64, "Most partial completions the replay buffer keeps (the newest).")
    # Train.
    ppo_epochs: int = setting(2, "Passes over each batch.")
    minibatches: int = setting(1, "Optimizer updates per epoch.")
    micro_batch: int | None = setting(None, "Rows per forward/backward (gradients are summed).")
    shared_prompt: bool = setting(
        True,
        "Run the prompt of a group once for its G completions in the reference, old-log-prob and update "
        "passes (forward and backward; the log-probs are the per-row ones). Rows of one prompt are found "
        "in the batch; --no-shared-prompt runs every row whole.",
    )
    lr: float = setting(1e-6, "Peak learning rate.")
    optimizer: str = setting("lion", "lion or adamw.")
    weight_decay: float = setting(1e-8, "Decoupled weight decay.")
    warmup: float = setting(0.05, "Warm-up fraction of all updates.")
    beta: float = setting(0.04, "KL coefficient; 0 keeps no reference model.")
    kl: str = setting("k3", "KL estimator: k1, k2 or k3.")
    clip_low: float = setting(0.2, "Ratio clip below: 1 - clip_low (1: no lower clip).")
    clip_high: float = setting(0.3, "Ratio clip above: 1 + clip_high.")
    loss_agg: str = setting("token", "token (global token mean), sequence, or dr_grpo.")
    loss: str = setting(
        "ppo",
        "Policy-gradient term: ppo (-min(r A, clip(r) A)) or cispo (MiniMax-M1: -sg(clip(r)) A log p; "
        "--clip-low 1 leaves no lower clip).",
    )
    ratio_level: str = setting(
        "token",
        "Importance ratio per token, or per sequence (GSPO: exp of the mean log-ratio over the "
        "completion, clipped as a whole; recipe gspo).",
    )
    entropy_coef: float = setting(
        0.0, "Entropy bonus: the loss gets -coef x the completion tokens' entropy (aggregated as the loss)."
    )
    tis_cap: float | None = setting(None, "Truncated importance sampling against the sampler's log-probs.")
    router_aux_coef: float = setting(
        0.0,
        "Mixture-of-experts models: add this times the router's load-balancing loss (HF's "
        "router_aux_loss_coef formula, reported as router_aux) to the loss; 0 only reports it.",
    )
    lora_rank: int = setting(
        0,
        "LoRA: train rank-R adapters on a frozen base (0 = full fine-tuning). The base is the KL reference; "
        "checkpoints hold the adapters only.",
    )
    lora_alpha: float = setting(32.0, "LoRA scale numerator: the adapters' product is scaled by alpha / rank.")
    lora_dropout: float = setting(0.0, "LoRA: dropout on the adapters' input in training forwards.")
    lora_targets: str = setting(
        "all",
        "LoRA: the weights that get adapters, comma-separated from q,k,v,o,gate,up,down,experts_gate,"
        "experts_up,experts_down; all = every one the model has (the attention only on a Qwen3-MoE with "
        "dense MLPs among its expert layers).",
    )
    train_vision: bool = setting(
        False,
        "Vision-language checkpoints: train the vision tower too (default: frozen; its features are "
        "computed once per batch).",
    )
    train_projector: bool = setting(
        True, "Vision-language checkpoints: train the projector (--no-train-projector freezes it)."
    )
    remat: str = setting("none", "none, nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable.")
    layer_loop: str = setting(
        "auto",
        "Decoder layers in the training forward: scan (one compiled layer body), unroll (faster on a CPU, "
        "longer to compile), or auto (unroll on a CPU without --remat, scan otherwise).",
    )
    compute_dtype: str | None = setting(
        None,
        "Dtype of activations and matmuls (float32, bfloat16, float16); parameters, gradients and optimizer "
        "state stay in the checkpoint's dtype, so --compute-dtype bfloat16 on a float32 checkpoint trains "
        "float32 master weights with bfloat16 compute. Default: the parameter dtype.",
    )
    attention: str = setting(
        "auto",
        "Attention kernel of the training forward: auto (cuDNN flash attention on a GPU with a "
        "bfloat16/float16 compute dtype, the Pallas flash kernel on a TPU, XLA otherwise), xla, cudnn, "
        "or pallas.",
    )
    # Evaluation on a held-out split (greedy pass@1).
    eval_every: int = setting(
        0, "Greedy held-out accuracy every N steps (and at step 0 and the end); 0 = off."
    )
    eval_data: str | None = setting(None, "Evaluation data (default: --data).")
    eval_split: str = setting("test", "Evaluation split.")
    eval_num_prompts: int = setting(100, "Evaluation problems.")
    # Run directory.
    save_every: int = setting(50, "Checkpoint every N steps (and at the end).")
    keep: int = setting(3, "Checkpoints kept (the newest).")
    save_rollouts: bool = setting(False, "Keep each step's scored records in RUN/rollouts/.")
    report_to: tuple[str, ...] = setting((), "tensorboard or wandb (extras); repeatable.")


DEFAULTS = Settings()

# The settings `training.make_train_config` reads: the flags `train` and `grpo` share.
TRAIN_SETTINGS = ("ppo_epochs", "minibatches", "micro_batch", "lr", "optimizer", "weight_decay", "warmup",
                  "steps", "beta", "kl", "clip_low", "clip_high", "loss_agg", "loss", "ratio_level",
                  "entropy_coef", "temperature", "tis_cap", "remat", "layer_loop", "compute_dtype", "attention",
                  "router_aux_coef", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
                  "shared_prompt", "train_vision", "train_projector")  # fmt: skip
