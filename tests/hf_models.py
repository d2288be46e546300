"""Tiny random HF transformers models (and a tiny tokenizer) saved to disk, for parity tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# name -> (config class name, config kwargs). Odd sizes on purpose: GQA ratio 3, head_dim != hidden/heads,
# tied and untied heads, Llama-3 and linear rope scaling, biases.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-tied": (
        "LlamaConfig",
        dict(
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=80,
            tie_word_embeddings=True,
        ),
    ),
    "llama-untied-llama3rope": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=96,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama-linear-rope-bias": (
        "LlamaConfig",
        dict(
            hidden_size=48,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=20,
            intermediate_size=64,
            attention_bias=True,
            tie_word_embeddings=False,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            intermediate_size=72,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2-tied": (
        "Qwen2Config",
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=24,
            intermediate_size=80,
            tie_word_embeddings=False,
        ),
    ),
    # Gemma: 4 layers so that both layer types and windows shorter than the test sequences are
    # exercised; soft-capping small enough to bend the scores and logits.
    "gemma2": (
        "Gemma2Config",
        dict(
            num_hidden_layers=4,
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=20,
            intermediate_size=80,
            sliding_window=5,
            query_pre_attn_scalar=18,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=4,
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=20,
            intermediate_size=80,
            sliding_window=5,
            query_pre_attn_scalar=18,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
            },
        ),
    ),
    # Qwen3-MoE: several experts, top-2, renormalised or not; odd expert widths.
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=20,
            intermediate_size=80,
            moe_intermediate_size=36,
            num_experts=5,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-moe-tied": (
        "Qwen3MoeConfig",
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=48,
            moe_intermediate_size=28,
            num_experts=7,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3-tied": (
        "Qwen3Config",
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=48,
            tie_word_embeddings=True,
        ),
    ),
}


def make_hf_model(name: str, seed: int = 0, vocab_size: int = 128, num_layers: int = 2) -> Any:
    import transformers

    cls_name, kwargs = TINY_CONFIGS[name]
    base = dict(
        vocab_size=vocab_size, num_hidden_layers=num_layers, max_position_embeddings=256, rms_norm_eps=1e-5
    )
    config = getattr(transformers, cls_name)(**{**base, **kwargs})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms default to ones; make them random so their math is tested too
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def checkpoint_tensors(model: Any, tensors: dict[str, Any] | None = None) -> dict[str, Any]:
    """A model's tensors (default its state_dict; or e.g. its parameters' gradients) under the names
    save_pretrained writes: transformers 5 fuses some checkpoint tensors in memory (Qwen3-MoE's
    per-expert projections into one gate_up_proj) and splits them back on saving."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(model.state_dict() if tensors is None else tensors))


def make_tokenizer(vocab_size: int = 128) -> Any:
    """A tiny word-level tokenizer with a ChatML chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials) - 6)] + [
        "system",
        "user",
        "assistant",
        "\n",
        "hi",
        "[UNK]",
    ]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = template
    return fast


def save_hf_model(
    name: str, folder: Path, *, seed: int = 0, safe: bool = True, max_shard_size: str | None = None
) -> Any:
    model = make_hf_model(name, seed)
    kwargs: dict[str, Any] = {}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    if not safe:  # transformers 5 writes only safetensors: make the legacy pickled layout by hand
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        torch.save(dict(model.state_dict()), folder / "pytorch_model.bin")
    make_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return model
