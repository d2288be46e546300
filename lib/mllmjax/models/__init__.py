"""Model families as plug-ins: one module per family (`llama`, `qwen2`, `qwen3`) composed from shared
`blocks`, run by one driver (`transformer`), listed in `registry`."""

from mllmjax.models.config import ModelConfig
from mllmjax.models.registry import family, from_hf_config, smollm2_135m, tiny

__all__ = ["ModelConfig", "family", "from_hf_config", "smollm2_135m", "tiny"]
