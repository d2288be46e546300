"""The model families, by name: the one table a new family is added to.

A family is one module that declares (see docs/adding-a-model.md):
    ARCHITECTURES, MODEL_TYPES   the HF `architectures` / `model_type` values it reads
    Config                       its `ModelConfig` subclass; `config_from_hf(hf)`, `tiny(**overrides)`
    param_specs(cfg)             shape and logical axes of every parameter
    HF_NAMES                     its HF name table (`params.Rule` rows)
    GGUF_ARCHITECTURE            llama.cpp's architecture name for it (the reading: weights/gguf_arch.py)
    rope(cfg, positions)         the rope tables its block reads
    block(cfg, p, x, kv, ctx)    one decoder layer

Vision-language models (`mllmjax.models.vision`: a vision tower and a projector in front of one of
these families) are a table of their own, `VISION_LANGUAGE`: they are not decoder families (no
`block`, no GGUF, a config of three parts), and the commands that run decoder families refuse them
(`mllmjax.checkpoint.refuse_vision_language`), so `FAMILIES` and what reads it stay text-only.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import mllmjax.models.gemma2 as gemma2
import mllmjax.models.gemma3 as gemma3
import mllmjax.models.llama as llama
import mllmjax.models.qwen2 as qwen2
import mllmjax.models.qwen3 as qwen3
import mllmjax.models.qwen3_moe as qwen3_moe
from mllmjax.errors import UnsupportedModelError
from mllmjax.models.config import ModelConfig

FAMILIES: dict[str, ModuleType] = {
    m.Config.family: m for m in (llama, qwen2, qwen3, gemma2, gemma3, qwen3_moe)
}


# Modules, imported on first use: they import this module (their text model is one of FAMILIES).
VISION_LANGUAGE: tuple[str, ...] = (
    "mllmjax.models.vision.llava",
    "mllmjax.models.vision.gemma3_vision",
)


def vision_language_models() -> dict[str, ModuleType]:
    """The vision-language modules by family name ("llava", "gemma3_vision")."""
    modules = [importlib.import_module(name) for name in VISION_LANGUAGE]
    return {m.Config.family: m for m in modules}


def vision_language_of_hf(hf: dict[str, Any]) -> ModuleType | None:
    """The vision-language module an HF config belongs to (by `architectures`, else `model_type`), or
    None for any other config."""
    models = vision_language_models().values()
    for arch in hf.get("architectures") or []:
        found = next((m for m in models if arch in m.ARCHITECTURES), None)
        if found is not None:
            return found
    return next((m for m in models if hf.get("model_type") in m.MODEL_TYPES), None)


def is_vision_language(family_name: str) -> bool:
    return family_name in vision_language_models()


def family(cfg: ModelConfig | str) -> ModuleType:
    """The module of a config's family (or of a family name)."""
    name = cfg if isinstance(cfg, str) else cfg.family
    if name not in FAMILIES:
        raise UnsupportedModelError(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def architectures() -> list[str]:
    return [arch for m in FAMILIES.values() for arch in m.ARCHITECTURES]


def family_of_hf(hf: dict[str, Any]) -> ModuleType:
    """The family an HF config belongs to: by its `architectures`, else its `model_type`."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    found = None
    for arch in archs:
        found = next((m for m in FAMILIES.values() if arch in m.ARCHITECTURES), found)
    if found is None:
        found = next((m for m in FAMILIES.values() if model_type in m.MODEL_TYPES), None)
    if found is None:
        for m in FAMILIES.values():  # a family may refuse a relative it does not read, with a reason
            if hasattr(m, "refuse_architecture"):
                m.refuse_architecture(hf)
        got = ", ".join(archs) or model_type or "nothing"
        if vision_language_of_hf(hf) is not None:
            raise UnsupportedModelError(
                f"{got} is a vision-language model: mllmjax converts and exports it, but this needs "
                f"a text model ({', '.join(architectures())})"
            )
        raise UnsupportedModelError(
            f"unsupported architecture {got}; supported: {', '.join(architectures())}"
        )
    return found


def family_of_gguf(arch: str) -> ModuleType | None:
    """The family of a GGUF `general.architecture`, or None."""
    return next((m for m in FAMILIES.values() if arch == m.GGUF_ARCHITECTURE), None)


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """The config of a transformers `config.json` dict; UnsupportedModelError on anything we would
    silently get wrong."""
    return family_of_hf(hf).config_from_hf(hf)


def model_config_from_hf(hf: dict[str, Any]) -> Any:
    """The config of any model mllmjax reads: a vision-language model's (`VISION_LANGUAGE`), else a
    decoder family's (`from_hf_config`)."""
    vl = vision_language_of_hf(hf)
    return vl.config_from_hf(hf) if vl is not None else from_hf_config(hf)


def tiny(family_name: str = "llama", **overrides: Any) -> ModelConfig:
    """A small config of a family for tests."""
    return family(family_name).tiny(**overrides)


def smollm2_135m() -> ModelConfig:
    return llama.LlamaConfig.smollm2_135m()
