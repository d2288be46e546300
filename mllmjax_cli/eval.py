"""`mllmjax eval`: held-out accuracy (pass@1, pass@k, maj@k) and format rate of a checkpoint."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mllmjax.settings import Settings
from mllmjax_cli.errors import err_console, handle_errors
from mllmjax_cli.flags import Override, with_settings
from mllmjax_cli.options import Force, Greedy, ImageField, Json, NumPrompts, Offset, image_dir_option
from mllmjax_cli.rollout import SAMPLING_SETTINGS, drawn_pictures, load_drawn, reads_images, sample_any

ImageDir = image_dir_option("OUT.images/ with -o, else a temporary folder removed at the end")

HELP = """Evaluate a checkpoint on a held-out split: pass@1 (greedy by default), and with -k K samples per
problem pass@k and maj@k (majority vote over extracted answers), plus the strict-format rate, mean length
and truncation rate. Correctness is `score`'s `correct` reward. A table goes to stderr; --json prints the
numbers as JSON on stdout; -o keeps the completions as rollout records.

A vision-language checkpoint (LLaVA, Gemma 3) is evaluated on prompts with images, as `rollout` samples them: a
visual built-in task (builtin:count, builtin:read; its pictures drawn into --image-dir, default
OUT.images/ with -o, else a temporary folder removed at the end) or data records with --image-field.

Examples:

  mllmjax eval ckpt/smollm2-135m --data builtin:arith --num-prompts 200

  mllmjax eval ckpt/step400 --data gsm8k --split test -k 8 --temperature 1.0 --json

  mllmjax eval ckpt/llava --data builtin:count --num-prompts 100
"""


def register(app: typer.Typer) -> None:
    @app.command(name="eval", help=HELP, short_help="Held-out accuracy: pass@1, pass@k, maj@k, format rate.")
    @handle_errors
    @with_settings(
        *SAMPLING_SETTINGS,
        split=Override("test"),  # evaluation is on held-out data
        # Greedy pass@1 unless several samples per problem are asked for.
        temperature=Override(
            None, "Sampling temperature; default 0 (greedy) for k=1, else 1.0.", type=float | None
        ),
    )
    def eval_(
        ckpt: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
        k: Annotated[int, typer.Option("-k", help="Samples per problem (pass@k, maj@k).")] = 1,
        greedy: Greedy = False,
        num_prompts: NumPrompts = None,
        offset: Offset = 0,
        out: Annotated[
            Path | None, typer.Option("-o", "--out", help="Also write the completions as rollout records.")
        ] = None,
        force: Force = False,
        json_out: Json = False,
        image_field: ImageField = "images",
        image_dir: ImageDir = None,
        **settings: Any,
    ) -> None:
        from mllmjax.checkpoint import check_output
        from mllmjax.distributed import decode_mesh
        from mllmjax.errors import BadInputError
        from mllmjax.evaluation import summarize
        from mllmjax.records import write_records
        from mllmjax.rollout import RolloutConfig
        from mllmjax.sampling import Sample

        if k < 1:
            raise BadInputError(f"-k must be >= 1, got {k}")
        if out is not None:
            check_output(out, force, file=True)
        mesh, dtype = settings.pop("mesh"), settings.pop("dtype")
        if settings["temperature"] is None:
            settings["temperature"] = 0.0 if k == 1 else 1.0
        s = Settings(**settings)
        cfg = RolloutConfig.from_settings(s, seed=s.seed, group_size=k, greedy=greedy)
        vision, visual_task = reads_images(ckpt, s.data)  # a clear error before the data is read
        with contextlib.ExitStack() as stack:
            pictures, kept = None, image_dir is not None or out is not None
            if vision and kept:  # kept, beside -o's records
                pictures = image_dir or Path(f"{out}.images")
                check_output(pictures, force)
                stack.enter_context(drawn_pictures(pictures))
            elif vision:  # only for this run (multi-host: each process's own)
                pictures = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mllmjax-eval-")))
            problems = load_drawn(
                s.data, split=s.split, question_field=s.question_field, answer_field=s.answer_field,
                num=num_prompts, offset=offset, image_field=image_field, image_dir=pictures, shared=kept,
            )  # fmt: skip
            start = time.perf_counter()
            records = sample_any(
                ckpt, problems, cfg, vision=vision, image_field=image_field, mesh=decode_mesh(mesh),
                dtype=dtype, meta={"data": s.data, "split": s.split}, label="eval",
            )  # fmt: skip
            result, _ = summarize(records)
            if out is not None:
                write_records(records, out, force=force)
        temperature = cfg.strategy.temperature if isinstance(cfg.strategy, Sample) else 0.0
        numbers = {"checkpoint": str(ckpt), "data": s.data, "split": s.split, "temperature": temperature,
                   **result.as_dict(), "seconds": time.perf_counter() - start}  # fmt: skip
        if json_out:
            typer.echo(json.dumps(numbers))
        table = Table(title=f"eval {ckpt} on {s.data} ({s.split}), {result.problems} problems x k={result.k}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = [("pass@1", result.pass_at_1), (f"pass@{result.k}", result.pass_at_k),
                (f"maj@{result.k}", result.maj_at_k), ("format", result.format_rate),
                ("truncated", result.truncation_rate)]  # fmt: skip
        for name, value in rows:
            table.add_row(name, f"{value:.3f}")
        table.add_row("mean tokens", f"{result.mean_tokens:.1f}")
        err_console.print(table)
