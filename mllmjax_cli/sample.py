"""`mllmjax sample`: generate completions from a checkpoint with the JAX decoder.

Plain text for a person (one prompt streams as it decodes), JSON Lines for scripts (`--json`, the
rollout record's field names). Prompts come from arguments, a file, or stdin (`--prompts -`): one JSON
object with a "prompt" field per line, or one plain-text prompt per line.

On a vision-language checkpoint (LLaVA, Gemma 3) a prompt may hold images (`--image`, or an "images" field of
paths in a JSON line): the checkpoint's own HF processor builds the prompt (its chat template's image
slots, the image token expansion, the pixel preprocessing), the vision tower turns it into input
embeddings once per prompt, and the sampler decodes from them (`sampling.generate_embeds`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from mllmjax.errors import BadInputError, RecordError, decode_utf8
from mllmjax.settings import Settings
from mllmjax_cli.errors import err_console, handle_errors
from mllmjax_cli.flags import Override, with_settings
from mllmjax_cli.options import Force, Greedy, Json
from mllmjax_cli.progress import stage_progress

if TYPE_CHECKING:
    from jax.sharding import Mesh

EXAMPLES = """
Examples:

  mllmjax sample CKPT "What is 12*7?"                       # streams one sampled completion
  mllmjax sample CKPT "Name a prime." -n 4 --temperature 0.7
  mllmjax sample CKPT --prompts questions.txt --json -o out.jsonl
  cat prompts.jsonl | mllmjax sample CKPT --prompts - --greedy --json
  mllmjax sample LLAVA_CKPT --image cat.png "What is in the picture?"
  mllmjax sample LLAVA_CKPT --prompts pics.jsonl --json      # {"prompt": ..., "images": ["a.png"]}
"""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt and the paths of its images (resolved: a JSON line's relative to its file)."""

    text: str
    images: tuple[Path, ...] = ()


def read_prompts(spec: str, stdin: TextIO | None = None) -> list[str]:
    """Prompts from a file (or '-' for stdin): JSON objects with a "prompt" field, or plain lines."""
    return [r.text for r in read_prompt_records(spec, stdin)]


def read_prompt_records(spec: str, stdin: TextIO | None = None) -> list[PromptRecord]:
    """`read_prompts` with each JSON line's "images" (a list of paths, relative to the file; to the
    working directory for stdin)."""
    name = "<stdin>" if spec == "-" else spec
    base = Path.cwd() if spec == "-" else Path(spec).parent
    if spec == "-":
        stream = stdin or sys.stdin
        binary = getattr(stream, "buffer", None)
        text = stream.read() if binary is None else decode_utf8(binary.read(), name)
    else:
        path = Path(spec)
        if not path.is_file():
            raise BadInputError(f"--prompts {spec}: {'is a directory' if path.is_dir() else 'no such file'}")
        text = decode_utf8(path.read_bytes(), name)
    lines = text.splitlines()
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(name, number, f"not valid JSON: {e.msg}") from None
            if not isinstance(record.get("prompt"), str):
                raise RecordError(name, number, 'a JSON line needs a string "prompt" field')
            images = record.get("images", [])
            if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images):
                raise RecordError(name, number, 'an "images" field must be a list of image file paths')
            prompts.append(PromptRecord(record["prompt"], tuple(base / x for x in images)))
        else:
            prompts.append(PromptRecord(line))
    if not prompts:
        raise BadInputError(f"--prompts {spec}: no prompts in {name} (it is empty)")
    return prompts


def encode(tokenizer: Any, prompt: str, *, chat: bool, system: str | None) -> list[int]:
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def register(app: typer.Typer) -> None:
    @app.command(
        name="sample",
        help="Generate completions with the JAX decoder. On a vision-language checkpoint (LLaVA, Gemma 3) a "
        "prompt may hold images (--image, or an \"images\" list in --prompts JSON lines), which the checkpoint's "
        "own processor prepares." + EXAMPLES,
        short_help="Generate completions with the JAX decoder.",
    )
    @handle_errors
    @with_settings(
        "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "system_prompt", "mesh", "dtype",
        "batch_size",
        max_new_tokens=Override(256),  # interactive use: short answers unless asked for more
        # A plain chat: no system turn of ours unless one is given.
        system_prompt=Override(None, "File whose text is the system message (chat mode; default: none)."),
    )  # fmt: skip
    def sample(
        ckpt: Annotated[Path, typer.Argument(help="Checkpoint directory (from `mllmjax convert`/`train`).")],
        prompt: Annotated[list[str] | None, typer.Argument(help="Prompt text; several give a batch.")] = None,
        prompts_file: Annotated[
            str | None,
            typer.Option(
                "--prompts", help='File of prompts ("-" = stdin): JSON lines with "prompt", or plain lines.'
            ),
        ] = None,
        n: Annotated[int, typer.Option("-n", help="Samples per prompt (the prompt is prefilled once).")] = 1,
        greedy: Greedy = False,
        chat: Annotated[
            bool | None,
            typer.Option(
                "--chat/--no-chat", help="Wrap prompts in the chat template (default: if it has one)."
            ),
        ] = None,
        images: Annotated[
            list[Path] | None,
            typer.Option(
                "--image",
                help="An image for the PROMPT (repeat for several; vision-language checkpoints). The "
                "prompt's image tokens are its slots, else one per image goes before its text.",
            ),
        ] = None,
        json_out: Json = False,
        out: Annotated[str, typer.Option("-o", "--out", help='Write the output here ("-" = stdout).')] = "-",
        force: Force = False,
        **settings: Any,
    ) -> None:
        from mllmjax.checkpoint import load_checkpoint, read_meta, resolve_dtype, stop_ids_for
        from mllmjax.cleanup import check_output
        from mllmjax.models.registry import is_vision_language
        from mllmjax.prompts import load_system_prompt
        from mllmjax.records import write_text_atomic
        from mllmjax.sampling import make_strategy
        from mllmjax.sharding import make_mesh

        if images and len(prompt or []) != 1:
            raise BadInputError(
                "--image goes with one PROMPT argument; for several prompts with images use --prompts FILE "
                'with an "images" field on each JSON line'
            )
        records = [PromptRecord(t, tuple(images or ())) for t in prompt or []]
        if prompts_file is not None:
            records += read_prompt_records(prompts_file)
        texts = [r.text for r in records]
        if not texts:
            raise BadInputError("no prompts: give PROMPT arguments or --prompts FILE (- for stdin)")
        if out != "-":
            check_output(out, force, file=True)
        mesh, dtype = settings.pop("mesh"), settings.pop("dtype")
        s = Settings(**settings)
        strategy = make_strategy(
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, greedy=greedy
        )
        system = load_system_prompt(s.system_prompt) if s.system_prompt is not None else None

        # A clear one-line error before any device work if CKPT is not a checkpoint.
        meta = read_meta(ckpt, vision_language=True)
        with_images = any(r.images for r in records)
        if is_vision_language(str(meta.get("family", ""))):
            _sample_vision(ckpt, records, strategy, n, s, chat, system, json_out, out, mesh, dtype)
            return
        if with_images:
            raise BadInputError(f"{ckpt} is a text model; --image needs a vision-language checkpoint")
        device_mesh = make_mesh(mesh)
        checkpoint = load_checkpoint(ckpt, mesh=device_mesh, dtype=resolve_dtype(dtype))
        params, cfg, tokenizer = checkpoint.params, checkpoint.cfg, checkpoint.tokenizer()
        ids = _encode_prompts(
            ckpt, tokenizer, texts, chat=chat, system=system, context=cfg.max_position_embeddings
        )
        stop_ids = stop_ids_for(tokenizer, checkpoint.stop_ids)

        if len(texts) == 1 and n == 1 and not json_out and out == "-":
            _stream_one(params, cfg, ids[0], strategy, tokenizer, s.max_new_tokens, stop_ids, s.seed)
            return
        completions = _run_batch(params, cfg, ids, strategy, n, s, stop_ids, device_mesh)
        sink = io.StringIO()
        _write(sink, completions, texts, ids, tokenizer, json_out)
        if out == "-":
            sys.stdout.write(sink.getvalue())
            sys.stdout.flush()
        else:  # the whole text first, then a temp file renamed into place: nothing half-written
            write_text_atomic(Path(out), sink.getvalue())


def _vision_inputs(
    ckpt: Path, processor: Any, records: list[PromptRecord], *, chat: bool | None, system: str | None
) -> list[tuple[list[int], Any]]:
    """(token ids, pixel values [N, C, H, W] or None) of each prompt, made by the checkpoint's HF
    processor (`mllmjax.images`): a prompt's image tokens are its image slots; one without them gets
    one slot per image (the chat template's image items; before the text without a template)."""
    from mllmjax import images as im

    use_chat = im.use_chat_template(ckpt, processor, chat)
    opened = {p: im.open_image(p) for r in records for p in r.images}  # every image read before any work
    inputs = []
    for i, r in enumerate(records):
        where = f"prompt {i + 1}"
        extra = im.image_slots(processor, r.text, len(r.images), where=where)
        if use_chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": im.user_content(r.text, extra)}
            ]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = im.plain_text(processor, r.text, extra)
        pictures = [opened[p] for p in r.images]
        inputs.append(im.processor_inputs(processor, text, pictures, chat=use_chat, where=where))
    return inputs


def _sample_vision(ckpt, records, strategy, n, s, chat, system, json_out, out, mesh, dtype) -> None:
    """`sample` on a vision-language checkpoint: the processor makes each prompt's ids and pixels, the
    vision tower and the text embeddings its input embeddings (once per prompt), the text model
    decodes from them (`sampling.generate_embeds`, or `stream` for one prompt on a terminal)."""
    from mllmjax.checkpoint import load_checkpoint, resolve_dtype, stop_ids_for
    from mllmjax.images import load_processor
    from mllmjax.models.vision import vlm
    from mllmjax.records import write_text_atomic
    from mllmjax.sharding import make_mesh

    processor = load_processor(ckpt)
    inputs = _vision_inputs(ckpt, processor, records, chat=chat, system=system)
    device_mesh = make_mesh(mesh)
    checkpoint = load_checkpoint(ckpt, mesh=device_mesh, dtype=resolve_dtype(dtype), vision_language=True)
    params, cfg, tokenizer = checkpoint.params, checkpoint.cfg, processor.tokenizer
    context = cfg.text.max_position_embeddings
    for i, (ids, _) in enumerate(inputs):
        if len(ids) >= context:
            raise BadInputError(f"prompt {i + 1} is {len(ids)} tokens; the model's context is {context}")
    embeds = [vlm.prompt_embeds(params, cfg, ids, pixels) for ids, pixels in inputs]
    reach = [vlm.prompt_reach(cfg, ids) for ids, _ in inputs]
    stop_ids = stop_ids_for(tokenizer, checkpoint.stop_ids)
    texts, ids = [r.text for r in records], [x[0] for x in inputs]
    if len(records) == 1 and n == 1 and not json_out and out == "-":
        _stream_one(
            params["text"],
            cfg.text,
            None,
            strategy,
            tokenizer,
            s.max_new_tokens,
            stop_ids,
            s.seed,
            embeds[0],
            reach[0],
        )
        return
    completions = _run_batch(
        params["text"], cfg.text, embeds, strategy, n, s, stop_ids, device_mesh, embeds=True, reach=reach
    )
    sink = io.StringIO()
    _write(sink, completions, texts, ids, tokenizer, json_out, images=[r.images for r in records])
    if out == "-":
        sys.stdout.write(sink.getvalue())
        sys.stdout.flush()
    else:
        write_text_atomic(Path(out), sink.getvalue())


def _encode_prompts(
    ckpt: Path, tokenizer: Any, texts: list[str], *, chat: bool | None, system: str | None, context: int
) -> list[list[int]]:
    """The prompts' token ids, in the chat template by default when the tokenizer has one."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise BadInputError(f"{ckpt}: the tokenizer has no chat template; use --no-chat")
    ids = [encode(tokenizer, t, chat=use_chat, system=system) for t in texts]
    for i, p in enumerate(ids):
        if len(p) >= context:
            raise BadInputError(f"prompt {i + 1} is {len(p)} tokens; the model's context is {context}")
    return ids


def _stream_one(
    params, cfg, prompt_ids, strategy, tokenizer, max_new_tokens, stop_ids, seed, embeds=None, reach=None
) -> None:
    from mllmjax.sampling import stream

    ids: list[int] = []
    shown = ""
    finish = None
    for chunk in stream(
        params,
        cfg,
        prompt_ids,
        strategy,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        seed=seed,
        embeds=embeds,
        reach=reach,
    ):
        ids += chunk.ids
        text = tokenizer.decode(ids, skip_special_tokens=True)
        # Print only the settled prefix: a partial multi-byte character decodes to U+FFFD until its
        # last token arrives.
        settled = text.rstrip("\ufffd") if chunk.finish_reason is None else text
        if settled.startswith(shown):
            sys.stdout.write(settled[len(shown) :])
            sys.stdout.flush()
            shown = settled
        finish = chunk.finish_reason
    sys.stdout.write("\n")
    err_console.print(f"[dim]({len(ids)} tokens, finish: {finish})[/]", markup=True)


def _run_batch(
    params: Any,
    cfg: Any,
    ids: list[list[int]],
    strategy: Any,
    n: int,
    s: Settings,
    stop_ids: Any,
    device_mesh: Mesh,
    *,
    embeds: bool = False,
    reach: list[Any] | None = None,
) -> list[Any]:
    """Decode every prompt n times; `ids` are token ids, or with embeds=True input embeddings [T, D]
    (reach: their tokens' reach, `generate_embeds`)."""
    from mllmjax.sampling import generate, generate_embeds

    start = time.perf_counter()
    with stage_progress("sample") as progress:
        task = progress.add_task("", total=len(ids) * n)

        def on_batch(tokens: int, samples: int) -> None:
            rate = tokens / max(time.perf_counter() - start, 1e-9)
            progress.update(task, completed=samples, description=f"{rate:.1f} tok/s")

        use_mesh = device_mesh if device_mesh.devices.size > 1 else None
        extra = dict(reach=reach) if embeds else {}
        return (generate_embeds if embeds else generate)(
            params,
            cfg,
            ids,
            strategy,
            n=n,
            max_new_tokens=s.max_new_tokens,
            stop_ids=stop_ids,
            seed=s.seed,
            max_batch=s.batch_size,
            mesh=use_mesh,
            on_batch=on_batch,
            **extra,
        )


def _write(sink: TextIO, completions, texts, ids, tokenizer, json_out: bool, images=None) -> None:
    """The completions as text or JSON lines; `images`: each prompt's image paths (vision prompts)."""
    for c in completions:
        text = tokenizer.decode(c.ids, skip_special_tokens=True)
        if json_out:
            record = {
                "prompt": texts[c.prompt_index],
                **({"images": [str(p) for p in images[c.prompt_index]]} if images else {}),
                "prompt_ids": ids[c.prompt_index],
                "sample": c.sample_index,
                "completion": text,
                "completion_ids": c.ids,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
            }
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            sink.write(
                f"--- prompt {c.prompt_index + 1}, sample {c.sample_index + 1} "
                f"({len(c.ids)} tokens, {c.finish_reason}) ---\n{text}\n"
            )
    sink.flush()
