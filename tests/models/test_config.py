from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch

from mllmjax import models
from mllmjax.errors import UnsupportedModelError


def test_reads_transformers5_and_legacy_rope_spellings():
    new = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "dtype": "bfloat16",
    }
    old = dict(new)
    del old["rope_parameters"]
    old.update(
        rope_theta=5e5,
        torch_dtype="bfloat16",
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    a, b = models.from_hf_config(new), models.from_hf_config(old)
    assert a == b
    assert a.rope_theta == 5e5 and dict(a.rope_scaling)["rope_type"] == "llama3"
    assert a.head_dim == 4


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = models.from_hf_config(hf.to_dict()).inv_freq()
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
            "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
        ),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
        ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ],
)
def test_rejects_what_it_would_get_wrong(change, message):
    base = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    base.update(change)
    with pytest.raises(UnsupportedModelError, match=message):
        models.from_hf_config(base)


def test_num_params_counts_the_tree():
    from mllmjax.models.params import map_specs

    for fam in ("llama", "qwen2", "qwen3"):
        cfg = models.tiny(fam)
        sizes = jax.tree.leaves(map_specs(lambda _, s: math.prod(s[0]), cfg.param_specs()))
        assert cfg.num_params() == sum(sizes)
    assert abs(models.smollm2_135m().num_params() - 134_515_008) < 1
