"""`mllmjax export`: a checkpoint back to an HF folder (safetensors) that transformers and vLLM load."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mllmjax_cli.errors import err_console, handle_errors
from mllmjax_cli.options import Force, Out

HELP = """Export a checkpoint as an HF folder: config.json, safetensors (sharded with an index when large),
tokenizer and generation_config.json. `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads it.

A LoRA checkpoint (train/grpo with --lora-rank) exports with its adapters merged into the base (--merge,
the default for one), or with --adapter as a PEFT adapter folder (adapter_config.json,
adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base_model, DIR)` loads.

A vision-language checkpoint (converted from an HF LlavaForConditionalGeneration or
Gemma3ForConditionalGeneration folder) exports as that model, with its processor files:
`transformers.AutoModelForImageTextToText.from_pretrained(HF_DIR)` loads it. Its LoRA adapters (on the
language model) export merged, or with --adapter as a PEFT folder for the VLM's own HF export.

Examples:

  mllmjax export runs/grpo/checkpoints/step_400 -o qwen-grpo-hf --dtype bfloat16

  mllmjax export runs/lora/checkpoints/step_400 --adapter -o qwen-grpo-lora
"""


def register(app: typer.Typer) -> None:
    @app.command(
        name="export",
        help=HELP,
        short_help="A checkpoint -> an HF folder (safetensors) for transformers / vLLM.",
    )
    @handle_errors
    def export(
        ckpt: Annotated[Path, typer.Argument(help="mllmjax checkpoint directory.")],
        out: Out,
        dtype: Annotated[
            str | None,
            typer.Option("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)."),
        ] = None,
        merge: Annotated[
            bool,
            typer.Option("--merge", help="A LoRA checkpoint: write the base with the adapters merged in."),
        ] = False,
        adapter: Annotated[
            bool,
            typer.Option("--adapter", help="A LoRA checkpoint: write its adapters as a PEFT adapter folder."),
        ] = False,
        force: Force = False,
    ) -> None:
        from mllmjax.convert import export as run

        result = run(ckpt, out, dtype=dtype, force=force, merge=merge, adapter=adapter)
        err_console.print(f"wrote {result.out} ({result.dtype}): {', '.join(result.files)}")
