"""How llama.cpp's `convert_hf_to_gguf.py` writes each architecture we read, inverted: one table entry
per llama.cpp `general.architecture`.

An entry says what `weights/gguf.py` needs to present a file as the HF checkpoint it was converted
from: the HF name of every per-layer GGUF tensor, the stacked expert tensors and their per-expert HF
names, whether llama.cpp permuted the q/k rows, the shift it added to the norm weights, the HF
activation key, and the HF config keys beyond the ones every decoder shares. This is knowledge of the
GGUF format, not of our model code, so it lives here: a file opens (names, config, tensors) whether or
not the family that runs it is registered yet; the families only declare which architecture they read
(`GGUF_ARCHITECTURE`).

Where the file is silent, the values are llama.cpp's own (`llama-model.cpp`, which runs the file), not
transformers' config defaults: e.g. Gemma's query scale, which llama.cpp derives from the model size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol


class Metadata(Protocol):
    """A file's metadata under its architecture's prefix: `get("expert_count")` reads
    `<arch>.expert_count`."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def require(self, key: str) -> Any: ...


# (config so far, metadata, the per-layer tensor names after `blk.N.`) -> the full HF config
ConfigRule = Callable[[dict[str, Any], Metadata, set[str]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class GGUFArch:
    hf_architecture: str  # the HF `architectures[0]`
    model_type: str  # the HF `model_type`
    layer_names: Mapping[str, str]  # GGUF name after `blk.N.` -> HF name after `model.layers.N.`
    hf_config: ConfigRule
    # stacked GGUF expert tensor [E, ...] after `blk.N.` -> one expert's HF name, `{j}` the expert
    expert_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    permuted_qk: bool = False  # llama.cpp permuted q/k rows so its RoPE rotates adjacent pairs
    norm_shift: float = 0.0  # llama.cpp stored `w + norm_shift` for every `*norm.weight`
    activation: tuple[str, str] = ("hidden_act", "silu")  # the HF config key and value


_ATTENTION = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_MLP = {
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Llama-style layers: `ffn_norm` is the norm before the MLP, HF's post_attention_layernorm.
_DENSE = {**_ATTENTION, "ffn_norm.weight": "post_attention_layernorm.weight", **_MLP}
# Gemma 2/3 layers norm both sides of each sublayer; llama.cpp's `ffn_norm` is the pre-MLP norm.
_GEMMA = {
    **_ATTENTION,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    **_MLP,
}
# Qwen3-MoE: the router is `ffn_gate_inp`; the experts are stacked [E, ...] per projection.
_MOE = {
    **_ATTENTION,
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
_EXPERTS = {
    "ffn_gate_exps.weight": "mlp.experts.{j}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{j}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{j}.down_proj.weight",
}


def _biased(layer_tensors: set[str]) -> bool:
    return "attn_q.bias" in layer_tensors


def _llama(config: dict[str, Any], meta: Metadata, layer_tensors: set[str]) -> dict[str, Any]:
    return {**config, "attention_bias": _biased(layer_tensors), "mlp_bias": False}


def _qwen2(config: dict[str, Any], meta: Metadata, layer_tensors: set[str]) -> dict[str, Any]:
    return config  # q/k/v biases are part of every Qwen2 layer, not a config switch


def _qwen3(config: dict[str, Any], meta: Metadata, layer_tensors: set[str]) -> dict[str, Any]:
    return {**config, "attention_bias": _biased(layer_tensors)}


def _qwen3moe(config: dict[str, Any], meta: Metadata, layer_tensors: set[str]) -> dict[str, Any]:
    experts = int(meta.require("expert_count"))
    return {
        **config,
        "attention_bias": _biased(layer_tensors),
        # Qwen's hub configs spell it num_experts; transformers 5 saves num_local_experts. Both, equal.
        "num_experts": experts,
        "num_local_experts": experts,
        "num_experts_per_tok": int(meta.require("expert_used_count")),
        "moe_intermediate_size": int(meta.require("expert_feed_forward_length")),
        # llama.cpp's qwen3moe graph always renormalises the top-k router weights.
        "norm_topk_prob": True,
        # and every layer is sparse (it has no dense-MLP layers to name).
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _layer_types(num_layers: int, pattern: int) -> list[str]:
    """llama.cpp's `set_swa_pattern(pattern)`: every pattern-th layer (1-based) attends globally."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def _query_pre_attn_scalar(config: dict[str, Any], layers_27b: int) -> int:
    """llama.cpp's Gemma query scale (after gemma_pytorch's config.py): the 27B models, known by their
    layer count, scale by hidden_size / num_heads, the others by head_dim. The file does not say."""
    if config["num_hidden_layers"] == layers_27b:
        return config["hidden_size"] // config["num_attention_heads"]
    return config["head_dim"]


def _gemma2(config: dict[str, Any], meta: Metadata, layer_tensors: set[str]) -> dict[str, Any]:
    layers = config["num_hidden_layers"]
    return {
        **config,
        "attention_bias": _biased(layer_tensors),
        "query_pre_attn_scalar": _query_pre_attn_scalar(config, layers_27b=46),
        # llama.cpp's defaults when the file leaves them out: a 4096-token window, caps 50 and 30.
        "sliding_window": int(meta.get("attention.sliding_window", 4096)),
        "layer_types": _layer_types(layers, 2),
        "attn_logit_softcapping": float(meta.get("attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(meta.get("final_logit_softcapping", 30.0)),
    }


def _gemma3(config: dict[str, Any], meta: Metadata, layer_tensors: set[str]) -> dict[str, Any]:
    config = dict(config)
    layers = config["num_hidden_layers"]
    # The file's rope base and scaling are the global layers'; llama.cpp runs the sliding layers with
    # base 10000 (or rope.freq_base_swa, which newer converters write) and no scaling.
    full = {
        "rope_type": "default",
        "rope_theta": config.pop("rope_theta"),
        **(config.pop("rope_scaling", None) or {}),
    }
    sliding = {"rope_type": "default", "rope_theta": float(meta.get("rope.freq_base_swa", 10000.0))}
    # Newer converters leave the window out of models without sliding layers; llama.cpp then runs
    # every layer globally.
    window = meta.get("attention.sliding_window")
    final_cap = meta.get("final_logit_softcapping")
    return {
        **config,
        "attention_bias": _biased(layer_tensors),
        "query_pre_attn_scalar": _query_pre_attn_scalar(config, layers_27b=62),
        "sliding_window": int(window) if window else None,
        "layer_types": _layer_types(layers, 6) if window else ["full_attention"] * layers,
        "rope_parameters": {"full_attention": full, "sliding_attention": sliding},
        "attn_logit_softcapping": None,
        "final_logit_softcapping": float(final_cap) if final_cap else None,
    }


_GELU_TANH = ("hidden_activation", "gelu_pytorch_tanh")

# Keyed by llama.cpp's `general.architecture`; the order is the order error messages list them in.
ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", _DENSE, _llama, permuted_qk=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2", _DENSE, _qwen2),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3", _DENSE, _qwen3),
    "gemma2": GGUFArch("Gemma2ForCausalLM", "gemma2", _GEMMA, _gemma2, norm_shift=1.0, activation=_GELU_TANH),
    "gemma3": GGUFArch(
        "Gemma3ForCausalLM", "gemma3_text", _GEMMA, _gemma3, norm_shift=1.0, activation=_GELU_TANH
    ),
    "qwen3moe": GGUFArch("Qwen3MoeForCausalLM", "qwen3_moe", _MOE, _qwen3moe, expert_names=_EXPERTS),
}
