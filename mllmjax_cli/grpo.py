"""`mllmjax grpo`: the whole GRPO loop in one process, with a live display, in a run directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mllmjax.grpo.config import GRPOConfig
from mllmjax_cli.errors import handle_errors
from mllmjax_cli.flags import FIELDS, flags_given, with_settings
from mllmjax_cli.grpo_display import run_with_display
from mllmjax_cli.options import Force, Json

HELP = """Run GRPO: each step samples G completions per prompt with the current parameters, scores them,
computes group advantages and runs the PPO epochs, all in memory; the same library functions as
rollout, score and train. The run directory (--out) holds config.json (every resolved setting),
metrics.jsonl (one line per step), checkpoints/step_N/ (every --save-every steps and at the end, the last
--keep kept), rollouts/ (--save-rollouts) and plots/*.png when it ends or stops.

With no --model and no --data it runs the embedded default: SmolLM2-135M-Instruct on the built-in
arithmetic task, sized for a CPU (the recipe `embedded-default`). Otherwise the defaults below apply:
GSM8K, G=16, 1 prompt per step, 2 PPO epochs, temperature 1, top-k 50, 1024 new tokens, rewards
1/0.5/0.5, Lion 1e-6, KL beta 0.04.

--lora-rank R trains rank-R LoRA adapters on the frozen start model (the KL reference) and saves
checkpoints that hold only the adapters (README: LoRA).

A vision-language --model (LLaVA, Gemma 3) runs with images: a visual built-in task (builtin:count,
builtin:read; pictures drawn into RUN/images/ as they are used) or data records with --image-field;
the language model and projector train, the tower stays frozen unless --train-vision; with
--lora-rank the adapters train on its language model alone.

--config FILE (TOML or YAML, keys are flag names) or a shipped recipe name sets any flag; flags given on
the command line override it. Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and
exits 0 printing the resume command; a second Ctrl-C abandons the step. --resume RUN continues from the
last checkpoint with the same data order and RNG, so the result equals an uninterrupted run.

Examples:

  mllmjax grpo                                   # the embedded default, ~6 minutes on a laptop CPU

  mllmjax grpo --config gsm8k-qwen2.5-3b --out runs/qwen3b --mesh fsdp=-1

  mllmjax grpo --model ckpt/smollm2 --data ../shared/data/gsm8k --steps 400 --eval-every 50

  mllmjax grpo --resume runs/qwen3b

  mllmjax grpo --model ckpt/llava --data builtin:count --steps 3 -o runs/count
"""


def register(app: typer.Typer) -> None:
    @app.command(name="grpo", help=HELP, short_help="The whole GRPO loop in one process, with live progress.")
    @handle_errors
    @with_settings(*FIELDS)  # every setting of a run is a flag
    def grpo(
        ctx: typer.Context,
        out: Annotated[Path | None, typer.Option("-o", "--out", help="Run directory (default: runs/grpo-DATE-TIME).")] = None,
        config: Annotated[str | None, typer.Option("--config", help="TOML/YAML settings file or recipe name (dapo, gspo, embedded-default, gsm8k-qwen2.5-3b, gemma3-1b-gsm8k, qwen3-30b-a3b-gsm8k).")] = None,
        resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run directory from its last checkpoint.")] = None,
        force: Force = False,
        json_out: Json = False,
        **settings: Any,
    ) -> None:  # fmt: skip
        cfg, run_dir = resolve_run(flags_given(ctx, settings), out=out, config=config, resume=resume)
        run_with_display(cfg, run_dir, resume=resume is not None, force=force, json_out=json_out)


def resolve_run(
    flags: dict[str, Any], *, out: Path | None, config: str | None, resume: Path | None
) -> tuple[GRPOConfig, Path]:
    """The run's settings and directory: a resumed run's saved settings (flags may only repeat them), or
    the config file's settings overridden by the flags typed."""
    from mllmjax.errors import BadInputError
    from mllmjax.grpo import build_config, normalise_settings, read_config_file, read_run_config

    if resume is None:
        file_settings = read_config_file(config) if config is not None else {}
        run_dir = out if out is not None else Path("runs") / time.strftime("grpo-%Y%m%d-%H%M%S")
        return build_config(file_settings, flags), run_dir
    if config is not None or out is not None:
        raise BadInputError("--resume RUN continues RUN with its saved settings; drop --config/--out")
    saved = read_run_config(resume)
    saved_settings = normalise_settings(
        {k: v for k, v in saved.items() if k in FIELDS}, where=str(resume / "config.json")
    )
    for name, value in flags.items():
        if saved_settings.get(name) != value:
            raise BadInputError(
                f"--resume continues {resume} with its saved settings; --{name.replace('_', '-')} "
                f"{value!r} differs from the saved {saved_settings.get(name)!r}"
            )
    return build_config(saved_settings), resume
