"""`mllmjax eval`: held-out accuracy (pass@1, pass@k, maj@k) and format rate of a checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mllmjax_cli.errors import err_console, handle_errors
from mllmjax_cli.options import (
    DEFAULT_MESH,
    AnswerField,
    Data,
    Dtype,
    Force,
    Greedy,
    Json,
    MaxBatch,
    MaxNewTokens,
    Mesh,
    MinP,
    NumPrompts,
    Offset,
    QuestionField,
    Seed,
    Split,
    SystemPromptFile,
    TopK,
    TopP,
    sampling_strategy_args,
)
from mllmjax_cli.rollout import sample_problems

HELP = """Evaluate a checkpoint on a held-out split: pass@1 (greedy by default), and with -k K samples per
problem pass@k and maj@k (majority vote over extracted answers), plus the strict-format rate, mean length
and truncation rate. Correctness is `score`'s `correct` reward. A table goes to stderr; --json prints the
numbers as JSON on stdout; -o keeps the completions as rollout records.

Examples:

  mllmjax eval ckpt/smollm2-135m --data builtin:arith --num-prompts 200

  mllmjax eval ckpt/step400 --data gsm8k --split test -k 8 --temperature 1.0 --json
"""


def register(app: typer.Typer) -> None:
    @app.command(name="eval", help=HELP, short_help="Held-out accuracy: pass@1, pass@k, maj@k, format rate.")
    @handle_errors
    def eval_(
        ckpt: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
        data: Data = "gsm8k",
        split: Split = "test",
        num_prompts: NumPrompts = None,
        offset: Offset = 0,
        k: Annotated[int, typer.Option("-k", help="Samples per problem (pass@k, maj@k).")] = 1,
        greedy: Greedy = False,
        temperature: Annotated[
            float | None,
            typer.Option("--temperature", help="Sampling temperature; default 0 (greedy) for k=1, else 1.0."),
        ] = None,
        top_k: TopK = 50,
        top_p: TopP = 1.0,
        min_p: MinP = 0.0,
        max_new_tokens: MaxNewTokens = 1024,
        seed: Seed = 0,
        system_prompt: SystemPromptFile = None,
        question_field: QuestionField = None,
        answer_field: AnswerField = None,
        out: Annotated[
            Path | None, typer.Option("-o", "--out", help="Also write the completions as rollout records.")
        ] = None,
        force: Force = False,
        json_out: Json = False,
        mesh: Mesh = DEFAULT_MESH,
        dtype: Dtype = "auto",
        batch_size: MaxBatch = 64,
    ) -> None:
        from mllmjax.checkpoint import check_output, read_meta
        from mllmjax.data import load_problems
        from mllmjax.errors import BadInputError
        from mllmjax.evaluation import summarize
        from mllmjax.prompts import load_system_prompt
        from mllmjax.records import write_records
        from mllmjax.rollout import RolloutConfig

        if k < 1:
            raise BadInputError(f"-k must be >= 1, got {k}")
        if out is not None:
            check_output(out, force)
        temp = temperature if temperature is not None else (0.0 if k == 1 else 1.0)
        cfg = RolloutConfig(
            group_size=k,
            max_new_tokens=max_new_tokens,
            seed=seed,
            max_batch=batch_size,
            system_prompt=load_system_prompt(system_prompt),
            **sampling_strategy_args(temp, greedy, top_k, top_p, min_p),
        )
        read_meta(ckpt)  # a clear error before the data is read
        problems = load_problems(
            data, split=split, question_field=question_field, answer_field=answer_field,
            num=num_prompts, offset=offset,
        )  # fmt: skip
        start = time.perf_counter()
        records = sample_problems(
            ckpt, problems, cfg, mesh=mesh, dtype=dtype, meta={"data": data, "split": split}, label="eval"
        )
        result, _ = summarize(records)
        if out is not None:
            write_records(records, out, force=force)
        numbers = {"checkpoint": str(ckpt), "data": data, "split": split, "temperature": cfg.temperature,
                   **result.as_dict(), "seconds": time.perf_counter() - start}  # fmt: skip
        if json_out:
            typer.echo(json.dumps(numbers))
        table = Table(title=f"eval {ckpt} on {data} ({split}), {result.problems} problems x k={result.k}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        rows = [("pass@1", result.pass_at_1), (f"pass@{result.k}", result.pass_at_k),
                (f"maj@{result.k}", result.maj_at_k), ("format", result.format_rate),
                ("truncated", result.truncation_rate)]  # fmt: skip
        for name, value in rows:
            table.add_row(name, f"{value:.3f}")
        table.add_row("mean tokens", f"{result.mean_tokens:.1f}")
        err_console.print(table)
