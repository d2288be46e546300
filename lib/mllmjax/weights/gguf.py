"""GGUF files (llama.cpp) as a `WeightSource`.

Design decisions:

- Read with the `gguf` package's `GGUFReader`, which memory-maps the file; `load()` dequantizes one
  tensor (any quant type, via `gguf.quants.dequantize`) and returns it as float32 in the HF layout, so
  a conversion never holds more than one dequantized tensor at a time. No torch.
- A file is read by the family whose `GGUF_ARCHITECTURE` matches its `general.architecture` (see
  `mllmjax.models.registry`); any other architecture is an UnsupportedModelError at open time, before
  anything is converted.
- Tensor names are mapped by a fixed table (llama.cpp `blk.N.attn_q` -> HF
  `model.layers.N.self_attn.q_proj`), the inverse of llama.cpp's `convert_hf_to_gguf.py`. A tensor the
  table does not know is a WeightsError: guessing would drop weights silently.
- llama.cpp permutes the rows of Llama's q/k projections (weights and biases) so that its RoPE can
  rotate adjacent pairs; we undo that for the families that declare `GGUF_PERMUTED_QK`.
- Float metadata is stored as float32 (rms_norm_eps 1e-5 comes back as 9.999999747e-06); we take the
  shortest decimal that round-trips through float32, i.e. the value the converter was given.
- Llama 3.1+ files carry RoPE scaling as a `rope_freqs` tensor (per-frequency divisors) instead of
  metadata. We recover the HF `llama3` rope_scaling dict from it when the standard Llama-3 parameters
  reproduce the tensor exactly, and refuse the file otherwise rather than run with the wrong RoPE.
- The tokenizer is built by transformers from the GGUF vocabulary/merges (`AutoTokenizer` with
  `gguf_file=`) and saved with the file's chat template; `generation_config.json` lists the stop ids
  by the same rule as for HF folders (`checkpoint.stop_ids_for`): the GGUF eos id and the chat
  end-of-turn token (`<|im_end|>`, `<|eot_id|>`) when the vocabulary has it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from mllmjax.errors import BadInputError, UnsupportedModelError, WeightsError
from mllmjax.models.registry import FAMILIES, family_of_gguf

# llama.cpp architecture -> its family module.
SUPPORTED_GGUF_ARCHITECTURES = {m.GGUF_ARCHITECTURE: m for m in FAMILIES.values()}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
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
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
# Not model parameters in HF: folded into hf_config()["rope_scaling"].
_ROPE_FREQS = "rope_freqs.weight"


def open_gguf(path: str | Path) -> GGUFSource:
    """Open a GGUF file as a WeightSource (metadata is read now, tensors on demand)."""
    return GGUFSource(Path(path))


class GGUFSource:
    """A GGUF file presented as HF-named float32 tensors plus an HF config and tokenizer."""

    def __init__(self, path: Path):
        import gguf

        self.path = Path(path)
        self.description = f"gguf:{self.path}"
        if not self.path.is_file():
            raise BadInputError(f"GGUF file not found: {self.path}")
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # the reader raises ValueError, struct/IndexError, OSError on bad files
            raise WeightsError(
                f"{self.path} is not a readable GGUF file (truncated or corrupt?): {_one_line(e)}"
            ) from e
        self.arch = self._field("general.architecture")
        self.family = family_of_gguf(self.arch)
        if self.family is None:
            raise UnsupportedModelError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
            )
        if self._field(f"{self.arch}.expert_count", 0):
            raise UnsupportedModelError(f"{self.path}: mixture-of-experts GGUF models are not supported")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._hf_to_gguf: dict[str, str] = {}
        for gguf_name in self._tensors:
            if gguf_name == _ROPE_FREQS:
                continue
            hf_name = _hf_name(gguf_name)
            if hf_name is None:
                raise WeightsError(
                    f"{self.path}: GGUF tensor {gguf_name!r} has no HF counterpart we know; the file is not "
                    f"a plain {'/'.join(SUPPORTED_GGUF_ARCHITECTURES)} model"
                )
            self._hf_to_gguf[hf_name] = gguf_name
        self._config = self._build_hf_config()
        # The vocabulary and merges (~100k small arrays) are only needed by the tokenizer, which
        # transformers reads from the file itself: drop them so they do not sit beside the weights.
        for key in [k for k in self._reader.fields if k.startswith("tokenizer.ggml.")]:
            del self._reader.fields[key]

    # ------------------------------------------------------------------ metadata
    def _field(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            return _field_value(field)
        except Exception as e:
            raise WeightsError(f"{self.path}: cannot read GGUF metadata {key!r}: {_one_line(e)}") from e

    def _require(self, key: str) -> Any:
        value = self._field(key)
        if value is None:
            raise WeightsError(f"{self.path}: GGUF metadata {key!r} is missing")
        return value

    def _build_hf_config(self) -> dict[str, Any]:
        arch = self.arch
        hidden = int(self._require(f"{arch}.embedding_length"))
        heads = int(self._require(f"{arch}.attention.head_count"))
        kv_heads = self._field(f"{arch}.attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer counts: hybrid models, none of our families
            if len(set(kv_heads)) != 1:
                raise UnsupportedModelError(f"{self.path}: per-layer key/value head counts are not supported")
            kv_heads = kv_heads[0]
        head_dim = int(self._field(f"{arch}.attention.key_length") or hidden // heads)
        rope_dim = self._field(f"{arch}.rope.dimension_count")
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise UnsupportedModelError(
                f"{self.path}: partial rotary embeddings (rope.dimension_count {rope_dim} != head_dim "
                f"{head_dim}) are not supported"
            )
        vocab = self._field(f"{arch}.vocab_size")
        if vocab is None:
            tokens = self._reader.fields.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise WeightsError(f"{self.path}: neither {arch}.vocab_size nor a token list is present")
            vocab = len(tokens.data)
        theta = float(self._field(f"{arch}.rope.freq_base", 10000.0))
        layer_tensors = {n.split(".", 2)[-1] for n in self._tensors if n.startswith("blk.")}
        config: dict[str, Any] = {
            "architectures": [self.family.ARCHITECTURES[0]],
            "model_type": arch,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._require(f"{arch}.feed_forward_length")),
            "num_hidden_layers": int(self._require(f"{arch}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": float(self._field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
            "max_position_embeddings": int(self._field(f"{arch}.context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "torch_dtype": "float32",
            "dtype": "float32",
        }
        config = self.family.gguf_hf_config(config, layer_tensors)
        scaling = self._rope_scaling(theta, head_dim)
        if scaling is not None:
            config["rope_scaling"] = scaling
        for key, hf_key in (
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("padding_token_id", "pad_token_id"),
        ):
            value = self._field(f"tokenizer.ggml.{key}")
            if value is not None:
                config[hf_key] = int(value)
        return config

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        arch = self.arch
        kind = self._field(f"{arch}.rope.scaling.type")
        if _ROPE_FREQS in self._tensors:
            if kind not in (None, "none"):
                raise UnsupportedModelError(
                    f"{self.path}: both rope_freqs and rope.scaling.type {kind!r}; cannot tell which applies"
                )
            return self._llama3_scaling(theta, head_dim)
        if kind in (None, "none"):
            return None
        factor = self._field(f"{arch}.rope.scaling.factor")
        if factor is None:
            raise WeightsError(f"{self.path}: rope.scaling.type {kind!r} without rope.scaling.factor")
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        orig = self._field(f"{arch}.rope.scaling.original_context_length")
        if orig is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        return scaling

    def _llama3_scaling(self, theta: float, head_dim: int) -> dict[str, Any]:
        """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency factors.

        convert_hf_to_gguf writes factor_i = 1 (high frequencies), `factor` (low frequencies) or the
        smoothed divisor in between; the standard Llama 3.x values of low/high_freq_factor and the
        original context (1, 4, 8192) with factor = max(factors) must reproduce the tensor exactly.
        """
        found = self._dequantize(_ROPE_FREQS).reshape(-1).astype(np.float64)
        factor = float(found.max())
        candidate = {
            "rope_type": "llama3",
            "factor": float(str(np.float32(factor))),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        expected = _llama3_rope_factors(theta, head_dim, candidate)
        if expected.shape != found.shape or not np.allclose(found, expected, rtol=1e-6, atol=0):
            raise UnsupportedModelError(
                f"{self.path}: its rope_freqs tensor does not match Llama-3 RoPE scaling with factor "
                f"{factor:g}; convert from the HF checkpoint instead"
            )
        return candidate

    def hf_config(self) -> dict[str, Any]:
        return dict(self._config)

    # ------------------------------------------------------------------ tensors
    def tensor_names(self) -> list[str]:
        return list(self._hf_to_gguf)

    def _gguf_tensor(self, name: str) -> Any:
        gguf_name = self._hf_to_gguf.get(name)
        if gguf_name is None:
            raise WeightsError(f"{self.path}: no tensor {name!r} in this GGUF file")
        return self._tensors[gguf_name]

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        # ggml lists dimensions fastest-first; HF (row-major) lists them slowest-first.
        return tuple(int(d) for d in reversed(self._gguf_tensor(name).shape))

    def _dequantize(self, gguf_name: str) -> np.ndarray:
        import gguf

        tensor = self._tensors[gguf_name]
        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            return np.asarray(data, dtype=np.float32).reshape(shape)
        except Exception as e:  # unknown quant type, short data
            raise WeightsError(
                f"{self.path}: cannot dequantize {gguf_name} ({tensor.tensor_type.name}): {_one_line(e)}"
            ) from e

    def load(self, name: str) -> np.ndarray:
        gguf_name = self._gguf_tensor(name).name
        array = self._dequantize(gguf_name)
        if self.family.GGUF_PERMUTED_QK:
            kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
            if kind == "attn_q":
                array = unpermute_rope_rows(array, self._config["num_attention_heads"])
            elif kind == "attn_k":
                array = unpermute_rope_rows(array, self._config["num_key_value_heads"])
        return np.ascontiguousarray(array)

    # ------------------------------------------------------------------ tokenizer
    def save_tokenizer(self, out_dir: Path) -> None:
        from transformers import AutoTokenizer

        from mllmjax.checkpoint import stop_ids_for, write_generation_config

        out_dir = Path(out_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:
            raise WeightsError(
                f"{self.path}: transformers cannot build a tokenizer from this GGUF: {_one_line(e)}"
            ) from e
        template = self._field("tokenizer.chat_template")
        if template and not tokenizer.chat_template:
            tokenizer.chat_template = template
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
        # One stop-id policy for every source: the GGUF eos plus the chat end-of-turn token, if present.
        base = {key: self._config[key] for key in ("bos_token_id", "pad_token_id") if key in self._config}
        write_generation_config(out_dir, stop_ids_for(tokenizer, self._config.get("eos_token_id")), base)

    def close(self) -> None:
        # Drop the memory map; numpy closes the file once no array views remain.
        self._tensors = {}
        self._reader = None  # type: ignore[assignment]


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_rope_rows(array: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute(w, n_head, n_head_kv)` of Llama q/k rows (weights [out, in] or
    biases [out]): per head, llama.cpp interleaves the two rotary halves; HF keeps them split."""
    rows = array.shape[0]
    half = rows // num_heads // 2
    return array.reshape(num_heads, half, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)


def _llama3_rope_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """The per-frequency divisors llama.cpp's convert_hf_to_gguf writes as `rope_freqs`."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float64)


def _field_value(field: Any) -> Any:
    """A metadata value as Python (str, int, float, bool or a list of them).

    Decoded from the reader's raw parts (as gguf's own gguf_dump does) rather than
    `ReaderField.contents()`, which older gguf releases lack.
    """
    import gguf

    kinds = field.types
    if not kinds:
        return None
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        if kinds[-1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if kinds[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    value = field.parts[field.data[0]].tolist()[0]
    if kinds[0] == gguf.GGUFValueType.FLOAT32:
        # The shortest decimal that round-trips through float32 is what the converter was given.
        value = float(str(np.float32(value)))
    return value


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
