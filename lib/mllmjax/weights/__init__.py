"""Weight sources and sinks.

Every source (a local HF folder, a hub id, a single safetensors file, a `.bin` file, a GGUF file)
presents the same `WeightSource` interface: the HF config dict, the HF tensor names, and a loader that
returns one tensor at a time in the HF layout (as transformers' state_dict would hold it). The family's
name table (`HF_NAMES`, applied by `mllmjax.weights.table`) then maps HF names onto our parameter tree,
so one table serves every source format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np


class WeightSource(Protocol):
    """A model's weights and metadata, read lazily, one tensor at a time."""

    description: str  # for messages and mllmjax.json "source"

    def hf_config(self) -> dict[str, Any]:
        """The transformers config.json contents."""
        ...

    def tensor_names(self) -> list[str]:
        """HF state_dict names of every tensor the source holds."""
        ...

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape in the HF layout, without reading the data."""
        ...

    def load(self, name: str) -> np.ndarray:
        """One tensor in the HF layout as a numpy array (float32, float16 or ml_dtypes.bfloat16)."""
        ...

    def save_tokenizer(self, out_dir: Path) -> None:
        """Write tokenizer files (+ chat template) and generation_config.json into out_dir."""
        ...

    def close(self) -> None: ...
