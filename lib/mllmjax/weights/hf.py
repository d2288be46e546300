"""Hugging Face weight sources: a local folder (sharded safetensors with an index, single safetensors,
or pickled `.bin` through torch), a single weights file with its config.json beside it, or a hub id
(downloaded through huggingface_hub into its cache, then read as a folder)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mllmjax.checkpoint import stop_ids_for, write_generation_config
from mllmjax.errors import ArtifactError, BadInputError, WeightsError
from mllmjax.weights.safetensors_io import SafetensorsFile

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# What a vision-language model's HF processor reads besides the tokenizer (the chat template is in
# TOKENIZER_FILES): carried by its checkpoint and its export.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HFSource:
    """A folder (or a single weights file) in the transformers layout."""

    def __init__(self, folder: Path, weight_files: list[Path], description: str):
        self.folder = folder
        self.description = description
        self._files: dict[str, Any] = {}  # name -> open file object (SafetensorsFile or torch dict)
        for wf in weight_files:
            if not wf.is_file():
                raise WeightsError(f"weights file {wf} is missing")
            handle = _open_weights(wf)
            for name in handle.names():
                self._files[name] = handle
        self._handles = list({id(h): h for h in self._files.values()}.values())

    def hf_config(self) -> dict[str, Any]:
        cfg_file = self.folder / "config.json"
        if not cfg_file.is_file():
            raise ArtifactError(f"{self.folder} has no config.json (an HF model folder needs one)")
        try:
            return json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{cfg_file}: invalid JSON: {e}") from e

    def tensor_names(self) -> list[str]:
        return list(self._files)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._files[name].shape(name))

    def load(self, name: str) -> np.ndarray:
        return self._files[name].load(name)

    def save_tokenizer(self, out_dir: Path) -> None:
        copied = [f for f in TOKENIZER_FILES if (self.folder / f).is_file()]
        if not copied:
            raise ArtifactError(
                f"{self.folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)"
            )
        for f in copied:
            shutil.copy2(self.folder / f, out_dir / f)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
        base: dict[str, Any] = {}
        gen_file = self.folder / "generation_config.json"
        if gen_file.is_file():
            base = json.loads(gen_file.read_text())
        extra = base.get("eos_token_id", self.hf_config().get("eos_token_id"))
        write_generation_config(out_dir, stop_ids_for(tokenizer, extra), base)

    def save_processor(self, out_dir: Path) -> list[str]:
        """Copy the processor's files (`PROCESSOR_FILES`) that the folder has; their names."""
        copied = [f for f in PROCESSOR_FILES if (self.folder / f).is_file()]
        for f in copied:
            shutil.copy2(self.folder / f, out_dir / f)
        return copied

    def close(self) -> None:
        for h in self._handles:
            h.close()


class _TorchFile:
    """A pickled state_dict, memory-mapped by torch so tensors are paged in as they are read."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError as e:
            raise BadInputError(
                f"{path} is a torch pickle; reading it needs torch (pip install torch)"
            ) from e
        try:
            self._sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise WeightsError(f"{path}: cannot read torch weights: {e}") from e

    def names(self) -> list[str]:
        return list(self._sd)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._sd[name].shape)

    def load(self, name: str) -> np.ndarray:
        from mllmjax.weights.table import _to_numpy

        return _to_numpy(self._sd[name])

    def close(self) -> None:
        self._sd = {}


def _open_weights(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _TorchFile(path)
    raise BadInputError(f"{path}: unknown weights format (expected .safetensors, .bin or .gguf)")


def open_hf_folder(folder: Path) -> HFSource:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ArtifactError(f"{index}: not a valid weights index: {e}") from e
            files = sorted({folder / f for f in weight_map.values()})
            return HFSource(folder, files, str(folder))
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return HFSource(folder, [folder / single], str(folder))
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if found:
        return HFSource(folder, [folder / f for f in found], str(folder))
    raise ArtifactError(
        f"{folder} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def open_weights_file(path: Path) -> HFSource:
    """A single .safetensors/.bin file; config.json and the tokenizer come from its folder."""
    if not (path.parent / "config.json").is_file():
        raise ArtifactError(f"{path}: no config.json beside it (a single weights file needs its HF config)")
    return HFSource(path.parent, [path], str(path))


def download_hub(repo_id: str, revision: str | None = None) -> Path:
    """Fetch config, tokenizer and safetensors of a hub model into the HF cache."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:
        raise BadInputError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}); "
            "check the id and the network, or pass a local folder or .gguf file"
        ) from e
    return Path(folder)
