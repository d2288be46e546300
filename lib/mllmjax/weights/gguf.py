"""GGUF files (llama.cpp) as a `WeightSource`.

Design decisions:

- Read with the `gguf` package's `GGUFReader`, which memory-maps the file; `load()` dequantizes one
  tensor (any quant type, via `gguf.quants.dequantize`) and returns it as float32 in the HF layout, so
  a conversion never holds more than one dequantized tensor at a time. No torch.
- What each architecture's file holds (its tensor names, q/k permutation, norm shift, experts and HF
  config keys) is `weights/gguf_arch.py`'s table, keyed by llama.cpp's `general.architecture`, the
  inverse of llama.cpp's `convert_hf_to_gguf.py`. A file opens whether or not the family that runs it
  is registered yet; only an architecture the table lacks is an UnsupportedModelError at open time,
  before anything is converted. A tensor the table does not know is a WeightsError: guessing would
  drop weights silently.
- llama.cpp permutes the rows of Llama's q/k projections (weights and biases) so that its RoPE can
  rotate adjacent pairs, and adds 1 to every Gemma `*norm.weight` (its RMSNorm multiplies by w, HF's
  by 1 + w); we undo both, in float32 as transformers' GGUF loader does.
- Mixture-of-experts files stack each projection's experts into one [E, ...] tensor; we present the
  HF checkpoint's per-expert names, each loading its slice. The last stacked tensor is kept
  dequantized, so loading its E experts in a row dequantizes it once, and only one is held at a time.
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
from types import ModuleType
from typing import Any

import numpy as np

from mllmjax.errors import BadInputError, UnsupportedModelError, WeightsError
from mllmjax.models.registry import family_of_gguf
from mllmjax.weights.gguf_arch import ARCHITECTURES, GGUFArch

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
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
        if self.arch == "clip":  # llama.cpp's mmproj file: the vision tower and projector of a LLaVA
            raise UnsupportedModelError(
                f"{self.path}: a GGUF vision projector (mmproj); GGUF vision-language models are not "
                "supported: convert the HF folder (LlavaForConditionalGeneration, safetensors) instead"
            )
        if self.arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        self.spec: GGUFArch = ARCHITECTURES[self.arch]
        if self.meta.get("expert_count", 0) and not self.spec.expert_names:
            moe = ", ".join(a for a, spec in ARCHITECTURES.items() if spec.expert_names)
            raise UnsupportedModelError(
                f"{self.path}: mixture-of-experts {self.arch!r} GGUF models are not supported; "
                f"supported mixture-of-experts architectures: {moe}"
            )
        self._tensors = {t.name: t for t in self._reader.tensors}
        # HF name -> (GGUF name, expert index into a stacked tensor or None)
        self._hf_to_gguf: dict[str, tuple[str, int | None]] = {}
        for gguf_name in self._tensors:
            if gguf_name != _ROPE_FREQS:
                self._hf_to_gguf.update(self._hf_names(gguf_name))
        self._stacked: tuple[str, np.ndarray] | None = None  # the last dequantized expert stack
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

    @property
    def meta(self) -> _ArchMetadata:
        """The metadata under this file's architecture prefix (`gguf_arch.Metadata`)."""
        return _ArchMetadata(self)

    def _build_hf_config(self) -> dict[str, Any]:
        """The keys every decoder shares, from the metadata; then the architecture's own (`gguf_arch`)."""
        meta = self.meta
        hidden = int(meta.require("embedding_length"))
        heads = int(meta.require("attention.head_count"))
        kv_heads = meta.get("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):  # per-layer counts: hybrid models, none of our families
            if len(set(kv_heads)) != 1:
                raise UnsupportedModelError(f"{self.path}: per-layer key/value head counts are not supported")
            kv_heads = kv_heads[0]
        head_dim = int(meta.get("attention.key_length") or hidden // heads)
        rope_dim = meta.get("rope.dimension_count")
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise UnsupportedModelError(
                f"{self.path}: partial rotary embeddings (rope.dimension_count {rope_dim} != head_dim "
                f"{head_dim}) are not supported"
            )
        vocab = meta.get("vocab_size")
        if vocab is None:
            tokens = self._reader.fields.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise WeightsError(f"{self.path}: neither {self.arch}.vocab_size nor a token list is present")
            vocab = len(tokens.data)
        theta = float(meta.get("rope.freq_base", 10000.0))
        act_key, act = self.spec.activation
        config: dict[str, Any] = {
            "architectures": [self.spec.hf_architecture],
            "model_type": self.spec.model_type,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(meta.require("feed_forward_length")),
            "num_hidden_layers": int(meta.require("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": head_dim,
            act_key: act,
            "rms_norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
            "max_position_embeddings": int(meta.get("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "torch_dtype": "float32",
            "dtype": "float32",
        }
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
        layer_tensors = {n.split(".", 2)[-1] for n in self._tensors if n.startswith("blk.")}
        return self.spec.hf_config(config, meta, layer_tensors)

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        kind = self.meta.get("rope.scaling.type")
        if _ROPE_FREQS in self._tensors:
            if kind not in (None, "none"):
                raise UnsupportedModelError(
                    f"{self.path}: both rope_freqs and rope.scaling.type {kind!r}; cannot tell which applies"
                )
            return self._llama3_scaling(theta, head_dim)
        if kind in (None, "none"):
            return None
        factor = self.meta.get("rope.scaling.factor")
        if factor is None:
            raise WeightsError(f"{self.path}: rope.scaling.type {kind!r} without rope.scaling.factor")
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        orig = self.meta.get("rope.scaling.original_context_length")
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

    @property
    def family(self) -> ModuleType | None:
        """The registered family that runs this file (None while its family is not registered)."""
        return family_of_gguf(self.arch)

    # ------------------------------------------------------------------ tensors
    def _hf_names(self, gguf_name: str) -> dict[str, tuple[str, int | None]]:
        """The HF name(s) a GGUF tensor holds: one, or one per expert of a stacked expert tensor."""
        if gguf_name in _GLOBAL_NAMES:
            return {_GLOBAL_NAMES[gguf_name]: (gguf_name, None)}
        match = _LAYER_RE.fullmatch(gguf_name)
        kind = match.group(2) if match else ""
        if kind in self.spec.layer_names:
            return {f"model.layers.{match.group(1)}.{self.spec.layer_names[kind]}": (gguf_name, None)}
        if kind in self.spec.expert_names:
            experts = int(self._tensors[gguf_name].shape[-1])  # ggml's slowest dimension
            declared = int(self.meta.require("expert_count"))
            if experts != declared:
                raise WeightsError(
                    f"{self.path}: {gguf_name} stacks {experts} experts but expert_count is {declared}"
                )
            pattern = f"model.layers.{match.group(1)}.{self.spec.expert_names[kind]}"
            return {pattern.format(j=j): (gguf_name, j) for j in range(experts)}
        raise WeightsError(
            f"{self.path}: GGUF tensor {gguf_name!r} has no HF counterpart we know; the file is not a "
            f"plain {self.arch} model"
        )

    def tensor_names(self) -> list[str]:
        return list(self._hf_to_gguf)

    def _gguf_tensor(self, name: str) -> tuple[str, int | None]:
        found = self._hf_to_gguf.get(name)
        if found is None:
            raise WeightsError(f"{self.path}: no tensor {name!r} in this GGUF file")
        return found

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        gguf_name, expert = self._gguf_tensor(name)
        # ggml lists dimensions fastest-first; HF (row-major) lists them slowest-first.
        shape = tuple(int(d) for d in reversed(self._tensors[gguf_name].shape))
        return shape if expert is None else shape[1:]

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
        gguf_name, expert = self._gguf_tensor(name)
        if expert is not None:
            if self._stacked is None or self._stacked[0] != gguf_name:
                self._stacked = None  # free the previous stack before dequantizing the next
                self._stacked = (gguf_name, self._dequantize(gguf_name))
            return self._stacked[1][expert].copy()  # a copy: the caller must not pin the whole stack
        self._stacked = None
        array = self._dequantize(gguf_name)
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
        if self.spec.permuted_qk and kind == "attn_q":
            array = unpermute_rope_rows(array, self._config["num_attention_heads"])
        elif self.spec.permuted_qk and kind == "attn_k":
            array = unpermute_rope_rows(array, self._config["num_key_value_heads"])
        if self.spec.norm_shift and gguf_name.endswith("norm.weight"):
            array = array - np.float32(self.spec.norm_shift)
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
        self._stacked = None
        self._reader = None  # type: ignore[assignment]


class _ArchMetadata:
    """`gguf_arch.Metadata` over a source: keys under its architecture's prefix."""

    def __init__(self, source: GGUFSource):
        self._source = source

    def get(self, key: str, default: Any = None) -> Any:
        return self._source._field(f"{self._source.arch}.{key}", default)

    def require(self, key: str) -> Any:
        return self._source._require(f"{self._source.arch}.{key}")


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
