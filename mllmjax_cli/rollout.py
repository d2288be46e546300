"""`mllmjax rollout`: G sampled completions per prompt -> rollout records (JSON Lines)."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mllmjax.settings import Settings
from mllmjax_cli.errors import err_console, handle_errors
from mllmjax_cli.flags import with_settings
from mllmjax_cli.options import Force, Greedy, ImageField, NumPrompts, Offset, Shuffle, image_dir_option
from mllmjax_cli.progress import stage_progress

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from mllmjax.data import Problem
    from mllmjax.records import RolloutRecord
    from mllmjax.rollout import RolloutConfig

ImageDir = image_dir_option("OUT.images/; needed with -o -")

# The settings rollout and eval share: what to sample from, how, and on which devices.
SAMPLING_SETTINGS = ("data", "split", "seed", "max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                     "system_prompt", "question_field", "answer_field", "mesh", "dtype", "batch_size")  # fmt: skip

HELP = """Sample G completions per prompt and write rollout records (schema mllmjax.rollout/1), one
completion per line, with prompt and completion ids, the sampled tokens' log-probs, the finish reason, the
gold answer and the checkpoint they came from. Deterministic for a seed. `-o -` streams to stdout so
`mllmjax score -` can read it.

On a vision-language checkpoint (LLaVA, Gemma 3) prompts may hold images: a data record's --image-field (a path
or a list of paths, relative to the data file), or the picture of a visual built-in task (builtin:count,
builtin:read), drawn into --image-dir (default OUT.images/). The checkpoint's own processor prepares
them, the vision tower runs once per prompt and the G samples share its prefill. Records with images
are schema mllmjax.rollout/2: /1 plus "images": [{"path", "sha256"}], paths relative to OUT's folder.

Examples:

  mllmjax rollout ckpt/smollm2-135m --data builtin:arith --num-prompts 8 -G 8 -o r.jsonl

  mllmjax rollout ckpt/qwen --data gsm8k --num-prompts 64 --shuffle --seed 1 -o - | mllmjax score - -o s.jsonl

  mllmjax rollout ckpt/llava --data builtin:count --num-prompts 8 -G 4 -o r.jsonl   # pictures in r.jsonl.images/
"""


def sample_problems(
    ckpt: Path,
    problems: list[Problem],
    cfg: RolloutConfig,
    *,
    mesh: Mesh,
    dtype: str,
    meta: dict[str, Any],
    label: str = "rollout",
    vision: bool = False,
) -> list[RolloutRecord]:
    """Load CKPT and sample cfg.group_size completions per problem on `mesh` (from
    `mllmjax.distributed.decode_mesh`), with a progress bar (prompts/s, tokens/s). Shared by rollout and
    eval. vision: CKPT is a vision-language checkpoint, whose own processor prepares the prompts and
    their images (`mllmjax.rollout.host_vision_rollouts`).

    Multi-host: the checkpoint is loaded over every host's devices (the default mesh), each host decodes
    its share of the problems on its own devices (`mesh`, one host's layout), and the records are
    gathered in problem order (the progress bar shows process 0's share)."""
    import jax

    from mllmjax.checkpoint import load_checkpoint, read_meta, resolve_dtype, stop_ids_for
    from mllmjax.distributed import process_share
    from mllmjax.rollout import gather_records, host_rollouts, host_vision_rollouts
    from mllmjax.sharding import make_mesh

    step = read_meta(ckpt, vision_language=vision).get("step", 0)
    processor = None
    if vision:  # its files are read before the weights
        from mllmjax.images import load_processor

        processor = load_processor(ckpt)
    load_mesh = make_mesh() if jax.process_count() > 1 else mesh
    checkpoint = load_checkpoint(ckpt, mesh=load_mesh, dtype=resolve_dtype(dtype), vision_language=vision)
    share = process_share(len(problems))
    common = {"policy": f"{ckpt}@{step}", "mesh": mesh, "meta": meta}
    with _progress(label, share.stop - share.start, cfg.group_size) as on_batch:
        if processor is not None:
            stop_ids = stop_ids_for(processor.tokenizer, checkpoint.stop_ids)
            records = host_vision_rollouts(
                checkpoint.params, checkpoint.cfg, processor, problems, cfg, stop_ids=stop_ids,
                on_batch=on_batch, **common,
            )  # fmt: skip
        else:
            records = host_rollouts(
                checkpoint.params, checkpoint.cfg, checkpoint.tokenizer(), problems, cfg,
                stop_ids=checkpoint.stop_ids, on_batch=on_batch, **common,
            )  # fmt: skip
    return gather_records(records)


@contextlib.contextmanager
def _progress(label: str, prompts: int, group_size: int) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over prompts x group_size samples; yields the sampler's on_batch(tokens, samples),
    which shows prompts/s and tokens/s."""
    start = time.perf_counter()
    with stage_progress(label) as progress:
        task = progress.add_task("", total=prompts * group_size)

        def on_batch(tokens: int, samples: int) -> None:
            dt = max(time.perf_counter() - start, 1e-9)
            rate = f"{samples / group_size / dt:.2f} prompts/s, {tokens / dt:.0f} tok/s"
            progress.update(task, completed=samples, description=rate)

        yield on_batch


def reads_images(ckpt: Path, data: str) -> tuple[bool, bool]:
    """(whether CKPT is a vision-language checkpoint, whether --data is a visual built-in task), read
    before the data is; a visual task on a text checkpoint is refused. Shared by rollout and eval."""
    from mllmjax.checkpoint import read_meta
    from mllmjax.data.builtin import parse_builtin_spec
    from mllmjax.data.visual import VISUAL_TASKS
    from mllmjax.errors import BadInputError
    from mllmjax.models.registry import is_vision_language

    vision = is_vision_language(str(read_meta(ckpt, vision_language=True).get("family", "")))
    spec = data.strip()
    visual_task = spec.startswith("builtin:") and parse_builtin_spec(spec).task in VISUAL_TASKS
    if visual_task and not vision:
        raise BadInputError(
            f"{ckpt} is a text model; {data} has a picture per question, which needs a vision-language checkpoint"
        )
    return vision, visual_task


def sample_any(
    ckpt: Path,
    problems: list[Problem],
    cfg: RolloutConfig,
    *,
    vision: bool,
    image_field: str,
    mesh: Mesh,
    dtype: str,
    meta: dict[str, Any],
    label: str = "rollout",
) -> list[RolloutRecord]:
    """`sample_problems` of a vision-language checkpoint or a text one; the text one refuses problems
    with images (their --image-field) with one line."""
    from mllmjax.errors import BadInputError

    if vision:
        return sample_problems(
            ckpt, problems, cfg, mesh=mesh, dtype=dtype, meta=meta, label=label, vision=True
        )
    with_images = next((p for p in problems if p.images), None)
    if with_images is not None:
        raise BadInputError(
            f"{ckpt} is a text model; problem {with_images.id} has images (--image-field "
            f"{image_field}), which need a vision-language checkpoint"
        )
    return sample_problems(ckpt, problems, cfg, mesh=mesh, dtype=dtype, meta=meta, label=label)


@contextlib.contextmanager
def drawn_pictures(folder: Path | None) -> Iterator[None]:
    """The folder a visual task draws its pictures into (and records' own images are written to,
    `mllmjax.data.IMAGE_DATA`): replaced if it exists (--force was checked),
    and removed again if the command fails or is interrupted, so nothing is left without its records.
    Multi-host: process 0's alone (it draws them: `load_drawn`), once every process has checked the
    command's outputs (it must not find the folder process 0 just made)."""
    from mllmjax import cleanup
    from mllmjax.distributed import barrier, is_primary

    if folder is None:
        yield
        return
    barrier("outputs checked")
    if not is_primary():
        yield
        return
    if folder.is_dir():
        shutil.rmtree(folder)
    elif folder.exists():
        folder.unlink()
    cleanup.register(folder, "dir")
    try:
        yield
    except BaseException:
        cleanup.remove(folder)
        raise
    cleanup.unregister(folder)


def load_drawn(data: str, *, image_dir: Path | None, shared: bool = True, **kwargs: Any) -> list[Problem]:
    """`load_problems` of --data; a visual task's pictures are drawn into image_dir by process 0 alone
    when the folder is `shared` (every host sees it, as `drawn_pictures`' kept one), by every process
    into its own otherwise, and every process waits until they are there. Shared by rollout and eval."""
    from mllmjax.data import load_problems
    from mllmjax.distributed import barrier, is_primary

    problems = load_problems(data, image_dir=image_dir, draw=is_primary() or not shared, **kwargs)
    barrier("pictures drawn")
    return problems


def register(app: typer.Typer) -> None:
    @app.command(
        name="rollout",
        help=HELP,
        short_help="G sampled completions per prompt -> rollout records (JSON Lines).",
    )
    @handle_errors
    @with_settings(*SAMPLING_SETTINGS, "group_size")
    def rollout(
        ckpt: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
        greedy: Greedy = False,
        num_prompts: NumPrompts = None,
        offset: Offset = 0,
        shuffle: Shuffle = False,
        show_prompt: Annotated[
            bool, typer.Option("--show-prompt", help="Print the system prompt in use and exit.")
        ] = False,
        out: Annotated[str, typer.Option("-o", "--out", help='Records file ("-" = stdout).')] = "-",
        force: Force = False,
        image_field: ImageField = "images",
        image_dir: ImageDir = None,
        **settings: Any,
    ) -> None:
        from mllmjax.checkpoint import check_output
        from mllmjax.distributed import decode_mesh
        from mllmjax.errors import BadInputError
        from mllmjax.prompts import load_system_prompt
        from mllmjax.records import write_records
        from mllmjax.rollout import RolloutConfig

        mesh, dtype = settings.pop("mesh"), settings.pop("dtype")
        s = Settings(**settings)
        if show_prompt:
            typer.echo(load_system_prompt(s.system_prompt))
            return
        if out != "-":
            check_output(Path(out), force, file=True)
        cfg = RolloutConfig.from_settings(s, seed=s.seed, greedy=greedy)
        vision, visual_task = reads_images(ckpt, s.data)
        pictures = None  # a visual task's pictures, and the images data records hold themselves
        if visual_task and image_dir is None and out == "-":
            raise BadInputError(f"{s.data} draws pictures: with -o - give --image-dir DIR for them")
        if vision and (image_dir is not None or out != "-"):
            pictures = image_dir if image_dir is not None else Path(f"{out}.images")
            check_output(pictures, force)
        meta = {"data": s.data, "split": s.split}
        start = time.perf_counter()
        with drawn_pictures(pictures):
            problems = load_drawn(
                s.data, split=s.split, question_field=s.question_field, answer_field=s.answer_field,
                num=num_prompts, offset=offset, shuffle=shuffle, seed=s.seed, image_field=image_field,
                image_dir=pictures,
            )  # fmt: skip
            records = sample_any(
                ckpt, problems, cfg, vision=vision, image_field=image_field, mesh=decode_mesh(mesh),
                dtype=dtype, meta=meta,
            )  # fmt: skip
            write_records(records, out, force=force)
        dt = time.perf_counter() - start
        tokens = sum(len(r.completion_ids) for r in records)
        stopped = sum(r.finish_reason == "stop" for r in records)
        err_console.print(
            f"{len(problems)} prompts x {cfg.group_size} = {len(records)} completions, {tokens} tokens in {dt:.1f}s "
            f"({tokens / dt:.0f} tok/s); {stopped / max(len(records), 1):.0%} stopped, the rest hit the length limit"
            + ("" if out == "-" else f"; wrote {out}")
        )
