"""`mllmjax convert`: HF / GGUF weights -> a sharded Orbax checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mllmjax_cli.errors import err_console, handle_errors
from mllmjax_cli.flags import with_settings
from mllmjax_cli.options import Force
from mllmjax_cli.progress import stage_progress

HELP = """Convert HF or GGUF weights into an mllmjax checkpoint (sharded Orbax params + config + tokenizer).

SOURCE is a hub id (Qwen/Qwen2.5-7B), a local HF folder (safetensors, sharded with an index, or .bin),
a single .safetensors/.bin file with config.json beside it, a .gguf file, or `smollm2-135m` for the
embedded SmolLM2-135M-Instruct.

A vision-language folder (LlavaForConditionalGeneration, Gemma3ForConditionalGeneration; safetensors)
converts too, with its processor files;
`mllmjax export` writes it back; `sample`, `rollout`, `eval`, `train` and `grpo` run it.

Examples:

  mllmjax convert smollm2-135m -o ckpt/smollm2

  mllmjax convert Qwen/Qwen2.5-7B -o ckpt/qwen7b --dtype bfloat16 --mesh fsdp=-1
"""


def register(app: typer.Typer) -> None:
    @app.command(name="convert", help=HELP, short_help="HF / GGUF weights -> a sharded Orbax checkpoint.")
    @handle_errors
    @with_settings("dtype", "mesh")
    def convert(
        source: Annotated[
            str, typer.Argument(help="Hub id, HF folder, weights file, .gguf, or smollm2-135m.")
        ],
        out: Annotated[
            Path | None, typer.Option("-o", "--out", help="Checkpoint directory to write.")
        ] = None,
        force: Force = False,
        **settings: Any,
    ) -> None:
        from mllmjax.convert import convert as run
        from mllmjax.sharding import make_mesh

        target = out if out is not None else Path(Path(source).name.removesuffix(".gguf") + "-mllmjax")
        with stage_progress("convert") as progress:
            task = progress.add_task("", total=None)

            def on_tensor(name: str, done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, description=name)

            result = run(
                source,
                target,
                dtype=settings["dtype"],
                mesh=make_mesh(settings["mesh"]),
                force=force,
                on_tensor=on_tensor,
            )
        c = result.cfg
        text = getattr(c, "text", c)  # a vision-language model: its text model's layers
        err_console.print(
            f"wrote {result.out}: {c.family}, {result.num_params / 1e6:.1f}M params, {result.dtype}, "
            f"{text.num_layers} layers, {result.param_bytes / 2**20:.0f} MiB, {result.seconds:.1f}s"
        )
