"""`mllmjax grpo`: the whole GRPO loop in one process, with a live display, in a run directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mllmjax.rewards import DEFAULT_REWARD_SPEC
from mllmjax_cli.errors import handle_errors
from mllmjax_cli.grpo_display import run_with_display
from mllmjax_cli.options import (
    Advantage,
    AnswerField,
    Attention,
    Beta,
    ClipHigh,
    ClipLow,
    ComputeDtype,
    Data,
    Dtype,
    Force,
    GroupSize,
    Json,
    Kl,
    LayerLoop,
    LossAgg,
    Lr,
    MaxBatch,
    MaxNewTokens,
    Mesh,
    MicroBatch,
    Minibatches,
    MinP,
    Optimizer,
    Overlong,
    OverlongPenalty,
    PpoEpochs,
    QuestionField,
    Remat,
    Reward,
    RewardFn,
    Seed,
    Split,
    Temperature,
    TisCap,
    TopK,
    TopP,
    Warmup,
    WeightDecay,
)

HELP = """Run GRPO: each step samples G completions per prompt with the current parameters, scores them,
computes group advantages and runs the PPO epochs, all in memory; the same library functions as
rollout, score and train. The run directory (--out) holds config.json (every resolved setting),
metrics.jsonl (one line per step), checkpoints/step_N/ (every --save-every steps and at the end, the last
--keep kept), rollouts/ (--save-rollouts) and plots/*.png when it ends or stops.

With no --model and no --data it runs the embedded default: SmolLM2-135M-Instruct on the built-in
arithmetic task, sized for a CPU (the recipe `embedded-default`). Otherwise the defaults are the
predecessor's GSM8K recipe (G=16, 1 prompt per step, 2 PPO epochs, temperature 1, top-k 50, 1024 new
tokens, rewards 1/0.5/0.5, Lion 1e-6, KL beta 0.04) with DESIGN.md's fixes.

--config FILE (TOML or YAML, keys are flag names) or a shipped recipe name sets any flag; flags given on
the command line override it. Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and
exits 0 printing the resume command; a second Ctrl-C abandons the step. --resume RUN continues from the
last checkpoint with the same data order and RNG, so the result equals an uninterrupted run.

Examples:

  mllmjax grpo                                   # the embedded default, ~20 minutes on a laptop CPU

  mllmjax grpo --config gsm8k-qwen2.5-3b --out runs/qwen3b --mesh fsdp=-1

  mllmjax grpo --model ckpt/smollm2 --data ../shared/data/gsm8k --steps 400 --eval-every 50

  mllmjax grpo --resume runs/qwen3b
"""

# Flag name -> GRPOConfig field, for the flags a config file can also set.
_SETTINGS = (
    "model", "data", "split", "question_field", "answer_field", "system_prompt", "steps", "prompts_per_step",
    "seed", "group_size", "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "batch_size", "reward",
    "reward_fn", "advantage", "overlong", "overlong_penalty", "dynamic_sampling", "max_sampling_rounds",
    "ppo_epochs", "minibatches", "micro_batch", "lr", "optimizer", "weight_decay", "warmup", "beta", "kl",
    "clip_low", "clip_high", "loss_agg", "tis_cap", "remat", "layer_loop", "compute_dtype", "attention",
    "eval_every", "eval_data", "eval_split", "eval_num_prompts", "save_every", "keep", "save_rollouts",
    "report_to", "mesh", "sample_mesh", "dtype",
)  # fmt: skip


def _flags_given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The settings the user typed (not defaults), so they override a config file."""
    given = {}
    for name in _SETTINGS:
        source = ctx.get_parameter_source(name)
        # By name: typer vendors its own copy of click, so its enum is not click's.
        if getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT"):
            value = values[name]
            given[name] = tuple(value) if isinstance(value, list) else value
    return given


def register(app: typer.Typer) -> None:
    @app.command(name="grpo", help=HELP, short_help="The whole GRPO loop in one process, with live progress.")
    @handle_errors
    def grpo(
        ctx: typer.Context,
        model: Annotated[str, typer.Option("--model", help="Checkpoint, hub id, HF folder, .gguf or smollm2-135m (converted into a cache on first use).")] = "smollm2-135m",
        data: Data = "gsm8k",
        split: Split = "train",
        question_field: QuestionField = None,
        answer_field: AnswerField = None,
        system_prompt: Annotated[str | None, typer.Option("--system-prompt", help="File whose text replaces the built-in system prompt.")] = None,
        steps: Annotated[int, typer.Option("--steps", help="GRPO steps.")] = 400,
        prompts_per_step: Annotated[int, typer.Option("--prompts-per-step", help="Prompts (groups) per step.")] = 1,
        seed: Seed = 0,
        group_size: GroupSize = 16,
        max_new_tokens: MaxNewTokens = 1024,
        temperature: Temperature = 1.0,
        top_k: TopK = 50,
        top_p: TopP = 1.0,
        min_p: MinP = 0.0,
        batch_size: MaxBatch = 64,
        reward: Reward = DEFAULT_REWARD_SPEC,
        reward_fn: RewardFn = None,
        advantage: Advantage = "grpo",
        overlong: Overlong = "none",
        overlong_penalty: OverlongPenalty = 1.0,
        dynamic_sampling: Annotated[bool, typer.Option("--dynamic-sampling", help="Sample more prompts until every group in the batch has varying rewards.")] = False,
        max_sampling_rounds: Annotated[int, typer.Option("--max-sampling-rounds", help="Most sampling rounds per step with --dynamic-sampling.")] = 4,
        ppo_epochs: PpoEpochs = 2,
        minibatches: Minibatches = 1,
        micro_batch: MicroBatch = None,
        lr: Lr = 1e-6,
        optimizer: Optimizer = "lion",
        weight_decay: WeightDecay = 1e-8,
        warmup: Warmup = 0.05,
        beta: Beta = 0.04,
        kl: Kl = "k3",
        clip_low: ClipLow = 0.2,
        clip_high: ClipHigh = 0.3,
        loss_agg: LossAgg = "token",
        tis_cap: TisCap = None,
        remat: Remat = "none",
        layer_loop: LayerLoop = "auto",
        compute_dtype: ComputeDtype = None,
        attention: Attention = "auto",
        eval_every: Annotated[int, typer.Option("--eval-every", help="Greedy held-out accuracy every N steps (and at step 0 and the end); 0 = off.")] = 0,
        eval_data: Annotated[str | None, typer.Option("--eval-data", help="Evaluation data (default: --data).")] = None,
        eval_split: Annotated[str, typer.Option("--eval-split", help="Evaluation split.")] = "test",
        eval_num_prompts: Annotated[int, typer.Option("--eval-num-prompts", help="Evaluation problems.")] = 100,
        save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps (and at the end).")] = 50,
        keep: Annotated[int, typer.Option("--keep", help="Checkpoints kept (the newest).")] = 3,
        save_rollouts: Annotated[bool, typer.Option("--save-rollouts", help="Keep each step's scored records in RUN/rollouts/.")] = False,
        report_to: Annotated[list[str] | None, typer.Option("--report-to", help="tensorboard or wandb (extras); repeatable.")] = None,
        mesh: Mesh = "data=1,fsdp=-1,tensor=1",
        sample_mesh: Annotated[str | None, typer.Option("--sample-mesh", help="Mesh for rollouts and eval over the same devices (default: --mesh), e.g. tensor=8 to decode tensor-parallel while training fsdp; the parameters are resharded in device memory before each rollout. Multi-host: each host decodes its share of the prompts on its own devices, so this describes one host's devices.")] = None,
        dtype: Dtype = "auto",
        out: Annotated[Path | None, typer.Option("-o", "--out", help="Run directory (default: runs/grpo-DATE-TIME).")] = None,
        config: Annotated[str | None, typer.Option("--config", help="TOML/YAML settings file or recipe name (gsm8k-qwen2.5-3b, embedded-default).")] = None,
        resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run directory from its last checkpoint.")] = None,
        force: Force = False,
        json_out: Json = False,
    ) -> None:  # fmt: skip
        from mllmjax.errors import BadInputError
        from mllmjax.grpo import build_config, normalise_settings, read_config_file, read_run_config

        values = dict(locals())
        flags = _flags_given(ctx, values)
        if resume is not None:
            if config is not None or out is not None:
                raise BadInputError("--resume RUN continues RUN with its saved settings; drop --config/--out")
            saved = read_run_config(resume)
            saved_settings = normalise_settings(
                {k: v for k, v in saved.items() if k in _SETTINGS}, where=str(resume / "config.json")
            )
            for name, value in flags.items():
                if saved_settings.get(name) != value:
                    raise BadInputError(
                        f"--resume continues {resume} with its saved settings; --{name.replace('_', '-')} "
                        f"{value!r} differs from the saved {saved_settings.get(name)!r}"
                    )
            cfg = build_config(saved_settings)
            run_dir = resume
        else:
            file_settings = read_config_file(config) if config is not None else {}
            cfg = build_config(file_settings, flags)
            run_dir = out if out is not None else Path("runs") / time.strftime("grpo-%Y%m%d-%H%M%S")
        run_with_display(cfg, run_dir, resume=resume is not None, force=force, json_out=json_out)
