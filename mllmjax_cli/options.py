"""Option aliases shared by every command, so that a flag means the same thing wherever it appears."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mllmjax.sampling.strategies import sampling_strategy_args  # noqa: F401  (re-exported for the commands)

Out = Annotated[Path, typer.Option("-o", "--out", help="Where to write the result.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; runs are deterministic for a seed.")]
Mesh = Annotated[
    str,
    typer.Option(
        "--mesh",
        help="Device mesh as axis=size pairs over (data, fsdp, tensor); -1 takes the remaining devices.",
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Parameter dtype: float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on accelerators).",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]

DEFAULT_MESH = "data=1,fsdp=-1,tensor=1"

# Sampling: the same flags on sample, rollout, eval and grpo.
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Most new tokens per completion.")]
Temperature = Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy.")]
Greedy = Annotated[bool, typer.Option("--greedy", help="Shorthand for --temperature 0.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the k most probable tokens; 0 = off.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus: keep the top probability mass p; 1 = off.")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens below p x the top probability; 0 = off.")]
GroupSize = Annotated[int, typer.Option("-G", "--group-size", help="Completions per prompt (one group).")]
MaxBatch = Annotated[int, typer.Option("--batch-size", help="Most rows (prompts x samples) decoded at once.")]

# Data: the same flags on rollout, eval and grpo.
Data = Annotated[
    str,
    typer.Option(
        "--data",
        help="gsm8k, a hub id owner/name[:config], a .jsonl/.parquet file, or builtin:TASK (offline).",
    ),
]
Split = Annotated[str, typer.Option("--split", help="Dataset split.")]
NumPrompts = Annotated[int | None, typer.Option("--num-prompts", help="How many prompts (default: all).")]
Offset = Annotated[int, typer.Option("--offset", help="Skip this many prompts first.")]
Shuffle = Annotated[bool, typer.Option("--shuffle", help="Shuffle the prompts (deterministic for --seed).")]
QuestionField = Annotated[
    str | None,
    typer.Option("--question-field", help="Record field holding the question (default: question)."),
]
AnswerField = Annotated[
    str | None, typer.Option("--answer-field", help="Record field holding the gold answer (default: answer).")
]
SystemPromptFile = Annotated[
    Path | None,
    typer.Option(
        "--system-prompt", help="File whose text replaces the built-in system prompt (--show-prompt)."
    ),
]


# Training: the same flags on train and grpo.
PpoEpochs = Annotated[int, typer.Option("--ppo-epochs", help="Passes over each batch.")]
Minibatches = Annotated[int, typer.Option("--minibatches", help="Optimizer updates per epoch.")]
MicroBatch = Annotated[
    int | None, typer.Option("--micro-batch", help="Rows per forward/backward (gradients are summed).")
]
Lr = Annotated[float, typer.Option("--lr", help="Peak learning rate.")]
Optimizer = Annotated[str, typer.Option("--optimizer", help="lion or adamw.")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="Decoupled weight decay.")]
Warmup = Annotated[float, typer.Option("--warmup", help="Warm-up fraction of all updates.")]
Beta = Annotated[float, typer.Option("--beta", help="KL coefficient; 0 keeps no reference model.")]
Kl = Annotated[str, typer.Option("--kl", help="KL estimator: k1, k2 or k3.")]
ClipLow = Annotated[float, typer.Option("--clip-low", help="Ratio clip below: 1 - clip_low.")]
ClipHigh = Annotated[float, typer.Option("--clip-high", help="Ratio clip above: 1 + clip_high.")]
LossAgg = Annotated[str, typer.Option("--loss-agg", help="token (global token mean), sequence, or dr_grpo.")]
TisCap = Annotated[
    float | None,
    typer.Option("--tis-cap", help="Truncated importance sampling against the sampler's log-probs."),
]
ComputeDtype = Annotated[
    str | None,
    typer.Option(
        "--compute-dtype",
        help="Dtype of activations and matmuls (float32, bfloat16, float16); parameters, gradients and "
        "optimizer state stay in the checkpoint's dtype, so --compute-dtype bfloat16 on a float32 "
        "checkpoint trains float32 master weights with bfloat16 compute. Default: the parameter dtype.",
    ),
]
Attention = Annotated[
    str,
    typer.Option(
        "--attention",
        help="Attention kernel of the training forward: auto (cuDNN flash attention on a GPU with a "
        "bfloat16/float16 compute dtype, the Pallas flash kernel on a TPU, XLA otherwise), xla, cudnn, "
        "or pallas.",
    ),
]
Remat = Annotated[
    str,
    typer.Option("--remat", help="none, nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable."),
]
LayerLoop = Annotated[
    str,
    typer.Option(
        "--layer-loop",
        help="Decoder layers in the training forward: scan (one compiled layer body), unroll (faster on a "
        "CPU, longer to compile), or auto (unroll on a CPU without --remat, scan otherwise).",
    ),
]

# Scoring: the same flags on score and grpo.
Reward = Annotated[str, typer.Option("--reward", help="Rewards and weights, name=weight comma-separated.")]
RewardFn = Annotated[
    list[str] | None,
    typer.Option(
        "--reward-fn",
        help="A custom reward package.module:function[=weight] (weight 1 by default); repeatable.",
    ),
]
Advantage = Annotated[
    str, typer.Option("--advantage", help="Advantage estimator: grpo, dr_grpo, rloo, reinforce, grpo_clip2.")
]
Overlong = Annotated[
    str,
    typer.Option(
        "--overlong",
        help="Completions cut at max length: none; mask (advantage 0); penalty (reward -= --overlong-penalty).",
    ),
]
OverlongPenalty = Annotated[float, typer.Option("--overlong-penalty", help="Penalty for --overlong penalty.")]
