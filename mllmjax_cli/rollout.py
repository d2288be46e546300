"""`mllmjax rollout`: G sampled completions per prompt -> rollout records (JSON Lines)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from mllmjax_cli.errors import err_console, handle_errors
from mllmjax_cli.options import (
    DEFAULT_MESH,
    AnswerField,
    Data,
    Dtype,
    Force,
    Greedy,
    GroupSize,
    MaxBatch,
    MaxNewTokens,
    Mesh,
    MinP,
    NumPrompts,
    Offset,
    QuestionField,
    Seed,
    Shuffle,
    Split,
    SystemPromptFile,
    Temperature,
    TopK,
    TopP,
    sampling_strategy_args,
)
from mllmjax_cli.progress import stage_progress

HELP = """Sample G completions per prompt and write rollout records (schema mllmjax.rollout/1), one
completion per line, with prompt and completion ids, the sampled tokens' log-probs, the finish reason, the
gold answer and the checkpoint they came from. Deterministic for a seed. `-o -` streams to stdout so
`mllmjax score -` can read it.

Examples:

  mllmjax rollout ckpt/smollm2-135m --data builtin:arith --num-prompts 8 -G 8 -o r.jsonl

  mllmjax rollout ckpt/qwen --data gsm8k --num-prompts 64 --shuffle --seed 1 -o - | mllmjax score - -o s.jsonl
"""


def sample_problems(
    ckpt: Path, problems: list, cfg: Any, *, mesh: str, dtype: str, meta: dict, label: str = "rollout"
) -> list:
    """Load CKPT onto the mesh and sample cfg.group_size completions per problem, with a progress bar
    (prompts/s, tokens/s). Shared by rollout and eval.

    Multi-host: the checkpoint is loaded over every host's devices (fsdp), each host decodes its share
    of the problems on its own devices laid out by `mesh` (one host's layout), and the records are
    gathered in problem order (the progress bar shows process 0's share)."""
    import jax

    from mllmjax.checkpoint import load_checkpoint, read_meta, resolve_dtype
    from mllmjax.distributed import decode_mesh, process_share
    from mllmjax.rollout import gather_records, host_rollouts
    from mllmjax.sharding import DEFAULT_MESH, make_mesh

    step = read_meta(ckpt).get("step", 0)
    device_mesh = decode_mesh(mesh)
    load_mesh = make_mesh(DEFAULT_MESH) if jax.process_count() > 1 else device_mesh
    checkpoint = load_checkpoint(ckpt, mesh=load_mesh, dtype=resolve_dtype(dtype))
    start = time.perf_counter()
    with stage_progress(label) as progress:
        share = process_share(len(problems))
        task = progress.add_task("", total=(share.stop - share.start) * cfg.group_size)

        def on_batch(tokens: int, samples: int) -> None:
            dt = max(time.perf_counter() - start, 1e-9)
            rate = f"{samples / cfg.group_size / dt:.2f} prompts/s, {tokens / dt:.0f} tok/s"
            progress.update(task, completed=samples, description=rate)

        records = host_rollouts(
            checkpoint.params, checkpoint.cfg, checkpoint.tokenizer(), problems, cfg,
            stop_ids=checkpoint.stop_ids, policy=f"{ckpt}@{step}", mesh=device_mesh, meta=meta,
            on_batch=on_batch,
        )  # fmt: skip
    return gather_records(records)


def register(app: typer.Typer) -> None:
    @app.command(
        name="rollout",
        help=HELP,
        short_help="G sampled completions per prompt -> rollout records (JSON Lines).",
    )
    @handle_errors
    def rollout(
        ckpt: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
        data: Data = "gsm8k",
        split: Split = "train",
        num_prompts: NumPrompts = None,
        offset: Offset = 0,
        shuffle: Shuffle = False,
        seed: Seed = 0,
        group_size: GroupSize = 16,
        max_new_tokens: MaxNewTokens = 1024,
        temperature: Temperature = 1.0,
        greedy: Greedy = False,
        top_k: TopK = 50,
        top_p: TopP = 1.0,
        min_p: MinP = 0.0,
        system_prompt: SystemPromptFile = None,
        show_prompt: Annotated[
            bool, typer.Option("--show-prompt", help="Print the system prompt in use and exit.")
        ] = False,
        question_field: QuestionField = None,
        answer_field: AnswerField = None,
        out: Annotated[str, typer.Option("-o", "--out", help='Records file ("-" = stdout).')] = "-",
        force: Force = False,
        mesh: Mesh = DEFAULT_MESH,
        dtype: Dtype = "auto",
        batch_size: MaxBatch = 64,
    ) -> None:
        from mllmjax.checkpoint import check_output, read_meta
        from mllmjax.data import load_problems
        from mllmjax.prompts import load_system_prompt
        from mllmjax.records import write_records
        from mllmjax.rollout import RolloutConfig

        system = load_system_prompt(system_prompt)
        if show_prompt:
            typer.echo(system)
            return
        if out != "-":
            check_output(Path(out), force)
        cfg = RolloutConfig(
            group_size=group_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            max_batch=batch_size,
            system_prompt=system,
            **sampling_strategy_args(temperature, greedy, top_k, top_p, min_p),
        )
        read_meta(ckpt)  # a clear error before the data is read
        problems = load_problems(
            data, split=split, question_field=question_field, answer_field=answer_field,
            num=num_prompts, offset=offset, shuffle=shuffle, seed=seed,
        )  # fmt: skip
        start = time.perf_counter()
        records = sample_problems(
            ckpt, problems, cfg, mesh=mesh, dtype=dtype, meta={"data": data, "split": split}
        )
        write_records(records, out, force=force)
        dt = time.perf_counter() - start
        tokens = sum(len(r.completion_ids) for r in records)
        stopped = sum(r.finish_reason == "stop" for r in records)
        err_console.print(
            f"{len(problems)} prompts x {group_size} = {len(records)} completions, {tokens} tokens in {dt:.1f}s "
            f"({tokens / dt:.0f} tok/s); {stopped / max(len(records), 1):.0%} stopped, the rest hit the length limit"
            + ("" if out == "-" else f"; wrote {out}")
        )
