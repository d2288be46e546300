"""Images for vision-language prompts: reading them, hashing them, and turning a prompt with images into
token ids and pixels with the checkpoint's own HF processor.

`sample --image` and `rollout` on a vision-language checkpoint share this one path: the
processor (saved beside the checkpoint by `convert`) owns the chat template's image slots, the image
token expansion and the pixel preprocessing (resize, crop, normalise), so mllmjax never re-implements
any of them.

Design decisions:
- An image is read whole when it is opened (PIL opens lazily), so a missing or unreadable file is one
  `BadInputError` before any device work.
- A prompt's image tokens in its text are its slots and must match its images; a prompt without them
  gets one slot per image (the chat template's image items, before its text; `<image>\\n` lines before
  the text without a template).
- Records that carry images keep each file's SHA-256 (`file_sha256`), so a later stage can tell that the
  image it reads is the one the completions were sampled from.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllmjax.errors import ArtifactError, BadInputError


def open_image(path: str | Path) -> Any:
    """The image at path, read whole now; BadInputError if it cannot be read."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"image {path}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except Exception as e:  # PIL raises several kinds (UnidentifiedImageError, OSError, SyntaxError)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInputError(f"image {path}: not a readable image ({reason})") from None


def open_image_bytes(data: bytes) -> str:
    """The format of the encoded image `data` ("png", "jpeg", ...), read whole now; BadInputError if
    it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return (image.format or "png").lower()
    except Exception as e:  # as open_image
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInputError(
            f"an image of {len(data)} bytes held in the record: not a readable image ({reason})"
        ) from None


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_processor(ckpt: str | Path) -> Any:
    """The checkpoint's HF processor (tokenizer, image processor, chat template); ArtifactError if it
    cannot be loaded."""
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(ckpt)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{ckpt}: cannot load the HF processor: {reason}") from e


def use_chat_template(ckpt: str | Path, processor: Any, chat: bool | None) -> bool:
    """Whether prompts go through the processor's chat template (by default: if it has one)."""
    template = getattr(processor, "chat_template", None)
    use_chat = bool(template) if chat is None else chat
    if use_chat and not template:
        raise BadInputError(f"{ckpt}: the processor has no chat template; use --no-chat")
    return use_chat


def slot_token(processor: Any) -> str:
    """The token a prompt's text holds per image, which the processor expands into the image's tokens:
    LLaVA's image token, Gemma 3's <start_of_image>."""
    return getattr(processor, "boi_token", None) or processor.image_token


def expanded_text(processor: Any, text: str, tokens_per_image: int) -> str:
    """A prompt's text with each image slot written out as the processor expands it (Gemma 3: its
    `full_image_sequence`; LLaVA: tokens_per_image image tokens)."""
    full = getattr(processor, "full_image_sequence", None) or processor.image_token * tokens_per_image
    return text.replace(slot_token(processor), full)


def image_slots(processor: Any, text: str, num_images: int, *, where: str) -> int:
    """How many image slots to add before `text` for its images: none when the text holds image slots
    (`slot_token`: they are its slots, and must be as many as the images), else one per image."""
    image_token = slot_token(processor)
    slots = text.count(image_token)
    if slots and num_images != slots:
        raise BadInputError(
            f"{where} has {slots} image slot{'s' * (slots != 1)} ({image_token}) "
            f"but {num_images} image{'s' * (num_images != 1)}"
        )
    return 0 if slots else num_images


def user_content(text: str, extra_slots: int) -> Any:
    """A chat user turn's content: the text, after `extra_slots` image items."""
    if not extra_slots:
        return text
    return [{"type": "image"}] * extra_slots + [{"type": "text", "text": text}]


def processor_inputs(
    processor: Any, text: str, images: Sequence[Any], *, chat: bool, where: str
) -> tuple[list[int], Any]:
    """(token ids, pixel values [N, C, H, W] or None) of a prompt's final text (chat-templated when
    `chat`) and its opened images, made by the processor."""
    pictures = list(images) or None
    try:
        made = processor(text=text, images=pictures, return_tensors="np", add_special_tokens=not chat)
    except (ValueError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{where}: the processor refused it: {reason}") from None
    pixels = made.get("pixel_values") if pictures else None
    return made["input_ids"][0].tolist(), pixels


def plain_text(processor: Any, text: str, extra_slots: int) -> str:
    """A prompt's text without a chat template: one image slot line per extra slot, then the text."""
    return (slot_token(processor) + "\n") * extra_slots + text
