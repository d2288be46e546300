"""A checkpoint's tokenizer without loading torch.

`transformers.AutoTokenizer` imports torch (through its config and RoPE modules) whenever torch is
installed: seconds of a short command's start for a tokenizer that is a `tokenizers.Tokenizer` in the
end. Every checkpoint holds the fast tokenizer's `tokenizer.json` (convert writes it, from HF folders and
GGUF files alike), so the commands load that directly with the `tokenizers` library, and render chat
templates with transformers' own jinja renderer (`transformers.utils.chat_template_utils`, which loads
neither torch nor the model classes), so that templates render exactly as `apply_chat_template` does.

`Tokenizer` offers the part of the HF tokenizer interface the library uses: `tok(text,
add_special_tokens=...)["input_ids"]`, `decode(ids, skip_special_tokens=...)`,
`apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`, `chat_template`,
`eos_token_id`, `pad_token_id`, `get_vocab()`. `load_tokenizer` falls back to `AutoTokenizer` for a
folder without `tokenizer.json` (a slow-only tokenizer) or with `clean_up_tokenization_spaces` set.
A checkpoint's tokenizer.json is written by transformers' `save_pretrained`, so it already holds what
AutoTokenizer would add on loading (e.g. a BOS post-processor from `add_bos_token`). tests/test_tokenizer.py checks it against
AutoTokenizer on every tokenizer the tests build and on SmolLM2's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The special tokens an HF tokenizer passes to its chat template (`special_tokens_map`).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token's text: tokenizer_config.json stores a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja (transformers >= 4.43 saves it there), else the
    config's chat_template (a string, or a list of named templates of which "default" is used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` with a checkpoint's special tokens and chat template (module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer as Backend

        self.folder = folder = Path(folder)
        self._backend = Backend.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        self.chat_template = _chat_template(folder, config)
        self.special_tokens_map = {
            name: text for name in SPECIAL_TOKENS if (text := _token_text(config.get(name))) is not None
        }
        self.eos_token_id = self._id_of("eos_token")
        self.pad_token_id = self._id_of("pad_token")
        self.bos_token_id = self._id_of("bos_token")

    def _id_of(self, name: str) -> int | None:
        text = self.special_tokens_map.get(name)
        return None if text is None else self._backend.token_to_id(text)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self._backend.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, tokenize: bool = False, add_generation_prompt: bool = False
    ) -> str | list[int]:
        """The chat rendered by the checkpoint's template, as HF's apply_chat_template renders it."""
        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template")
        try:
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:  # a transformers without it: its tokenizer renders the template
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(self.folder))
            return hf.apply_chat_template(
                messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt
            )
        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map,
        )
        text = rendered[0]
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text


def _reproducible(folder: Path) -> bool:
    """Whether `Tokenizer` behaves as AutoTokenizer for this folder: it has tokenizer.json, and no
    `clean_up_tokenization_spaces` (whose effect differs between transformers versions)."""
    if not (folder / "tokenizer.json").is_file():
        return False
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    return not config.get("clean_up_tokenization_spaces")


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer of a checkpoint: `Tokenizer` where it reproduces AutoTokenizer, else
    AutoTokenizer itself."""
    folder = Path(folder)
    if _reproducible(folder):
        return Tokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
