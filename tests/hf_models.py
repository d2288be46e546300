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
    # Dense MLPs among the expert layers (HF's mlp_only_layers): layers 1 and 3 have the experts.
    "qwen3-moe-mixed": (
        "Qwen3MoeConfig",
        dict(
            num_hidden_layers=4,
            hidden_size=40,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=56,
            moe_intermediate_size=20,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0, 2],
            tie_word_embeddings=False,
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


# ---------------------------------------------------------------------------- vision-language (LLaVA)

# Tiny towers (tests/models/test_vision_parity.py, tests/test_vision_convert.py). Odd sizes: 4 heads of
# 10, an MLP of 56; SigLIP's 32-pixel images leave 2 rows and columns past the 5 x 5 patches of 6 (the
# conv drops them).
VISION_TOWERS: dict[str, tuple[str, dict[str, Any]]] = {
    "clip": ("CLIPVisionConfig", dict(image_size=30, patch_size=6)),
    "siglip": ("SiglipVisionConfig", dict(image_size=32, patch_size=6)),
}
TOWER_SIZES = dict(hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4)

# name -> (tower, text config class and sizes, LLaVA settings). Both strategies, an int and a list of
# feature layers, with and without projector biases, tied and untied heads.
LLAVAS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any]]] = {
    "clip-llama": (
        "clip",
        "LlamaConfig",
        dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=80),
        dict(vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu"),
    ),
    "siglip-qwen2": (
        "siglip",
        "Qwen2Config",
        dict(
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            tie_word_embeddings=True,
        ),
        dict(
            vision_feature_select_strategy="full",
            vision_feature_layer=[-3, -1],
            projector_hidden_act="gelu_pytorch_tanh",
            multimodal_projector_bias=False,
        ),
    ),
}
# Gemma 3 with vision: a SigLIP tower of 8 x 8 patches pooled 2 x 2 into 16 image tokens, a 2-layer
# Gemma 3 (one sliding layer, window 6: narrower than an image) under the same vocabulary.
GEMMA3_VISION: dict[str, Any] = dict(
    tower=dict(image_size=32, patch_size=4, vision_use_head=False),
    text=dict(
        hidden_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=80,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=12,
    ),
    mm_tokens_per_image=16,
)
# Every vision-language model of the tests: the LLaVAs and Gemma 3.
VLMS = (*LLAVAS, "siglip-gemma3")
LLAVA_VOCAB = 96
IMAGE_TOKEN = 95  # the last id: "<image>" in `make_llava_processor`'s tokenizer, Gemma 3's image token
BOI_TOKEN, EOI_TOKEN = 93, 94  # Gemma 3's <start_of_image>, <end_of_image>


def tower_config(kind: str) -> Any:
    import transformers

    cls_name, sizes = VISION_TOWERS[kind]
    return getattr(transformers, cls_name)(**TOWER_SIZES, **sizes)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norms default to ones and biases to zeros: make them random so their math is tested too."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_gemma3_vision(seed: int = 0) -> Any:
    """A tiny random Gemma3ForConditionalGeneration of `GEMMA3_VISION` (float32, eval mode); its
    projection matrix (zeros when HF builds it) random too."""
    import transformers

    vision = transformers.SiglipVisionConfig(**{**TOWER_SIZES, **GEMMA3_VISION["tower"]})
    text = transformers.Gemma3TextConfig(
        vocab_size=LLAVA_VOCAB, num_hidden_layers=2, max_position_embeddings=256, **GEMMA3_VISION["text"]
    )
    config = transformers.Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=GEMMA3_VISION["mm_tokens_per_image"],
        image_token_index=IMAGE_TOKEN,
        boi_token_index=BOI_TOKEN,
        eoi_token_index=EOI_TOKEN,
    )
    torch.manual_seed(seed)
    model = randomise(transformers.Gemma3ForConditionalGeneration(config), seed + 1)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    return model


def make_llava(name: str, seed: int = 0) -> Any:
    """A tiny random LlavaForConditionalGeneration of `LLAVAS[name]` (float32, eval mode), or with
    name "siglip-gemma3" a Gemma 3 with vision (`make_gemma3_vision`)."""
    import transformers

    if name == "siglip-gemma3":
        return make_gemma3_vision(seed)
    kind, text_cls, text_sizes, settings = LLAVAS[name]
    text = getattr(transformers, text_cls)(
        vocab_size=LLAVA_VOCAB,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        **text_sizes,
    )
    config = transformers.LlavaConfig(
        vision_config=tower_config(kind), text_config=text, image_token_id=IMAGE_TOKEN, **settings
    )
    torch.manual_seed(seed)
    return randomise(transformers.LlavaForConditionalGeneration(config), seed + 1)


# ChatML with image slots, as llava-hf's templates write them: a message's content is a string, or a
# list of {"type": "image"} (the image token) and {"type": "text", "text": ...} items.
LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for item in m['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The same with Gemma 3's image slot: the processor expands <start_of_image> into the image's tokens.
GEMMA3_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE.replace("<image>\n", "<start_of_image>")


def make_gemma3_processor(model: Any) -> Any:
    """A Gemma3Processor for `make_gemma3_vision`, built offline: `make_tokenizer` with Gemma 3's three
    image tokens (as its tokenizer names them) and its image processor (PIL backend) at the tower's
    size."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    words = make_tokenizer(BOI_TOKEN)
    words.add_tokens(["<start_of_image>", "<end_of_image>", "<image_soft_token>"], special_tokens=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words.backend_tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    assert [tokenizer.boi_token_id, tokenizer.image_token_id] == [BOI_TOKEN, IMAGE_TOKEN]
    size = model.config.vision_config.image_size
    return Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=model.config.mm_tokens_per_image,
    )


def make_llava_processor(model: Any) -> Any:
    """A LlavaProcessor for a `make_llava` model, built offline: `make_tokenizer` with "<image>" as the
    image token, and a CLIP image processor (PIL backend) at the tower's image size (a Gemma 3 model's
    processor: `make_gemma3_processor`)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    if model.config.model_type == "gemma3":
        return make_gemma3_processor(model)
    vision = model.config.vision_config
    tokenizer = make_tokenizer(LLAVA_VOCAB - 1)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    size = vision.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=int(vision.model_type == "clip_vision_model"),  # the class token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def save_llava(name: str, folder: Path, *, seed: int = 0) -> Any:
    """`make_llava` saved by save_pretrained into folder, with its processor (and so its tokenizer)."""
    model = make_llava(name, seed)
    model.save_pretrained(folder)
    make_llava_processor(model).save_pretrained(folder)
    return model
