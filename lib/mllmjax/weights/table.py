"""The streaming loader from HF-named tensors onto our parameter tree, and back, driven by the family's
name table (`family.HF_NAMES`), or by the table a caller passes (`rules=`: a vision tower's, a
projector's; `mllmjax.models.vision`).

Every source format presents HF names in the HF layout, so one table per family serves all of them.
`params_from_hf` reads one source tensor at a time into its (layer-stacked) parameter, placed on the
devices with its sharding as soon as it arrives, so host memory holds one tensor at a time. Every
source tensor must be used and every expected tensor present with the right shape, else a
WeightsError names the tensor.

A rule's HF name holds `{i}` for the layer and, in a mixture of experts, `{j}` for the expert: such a
tensor is the [layer] (or [layer, expert]) slice of a parameter stacked on those leading axes, written
into it in place as it arrives, and yielded slice by slice on export. In a stack that holds some
layers only (`ModelConfig.layer_stacks`: a mixed MoE model's experts), slot s is HF layer numbers[s].
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mllmjax.errors import WeightsError
from mllmjax.models.config import ModelConfig
from mllmjax.models.params import Params, Rule, flatten, map_specs, unflatten
from mllmjax.models.registry import family

# Source tensors that carry no weights (old checkpoints saved RoPE buffers).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

__all__ = ["KINDS", "Renamed", "Rule", "expected_hf_tensors", "hf_tensors_from_params", "params_from_hf"]


# kind -> (hf layout -> ours, ours -> hf layout), given (array, cfg)
def _heads_in(n_attr: str) -> tuple[Callable, Callable]:
    def fwd(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:  # [N*H, D] -> [D, N, H]
        return w.T.reshape(cfg.hidden_size, getattr(cfg, n_attr), cfg.head_dim)

    def inv(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return w.reshape(cfg.hidden_size, -1).T

    return fwd, inv


def _heads_bias(n_attr: str) -> tuple[Callable, Callable]:
    return (
        lambda b, cfg: b.reshape(getattr(cfg, n_attr), cfg.head_dim),
        lambda b, cfg: b.reshape(-1),
    )


KINDS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda w, cfg: w, lambda w, cfg: w),
    "transpose": (lambda w, cfg: w.T, lambda w, cfg: w.T),
    "q_in": _heads_in("num_heads"),
    "kv_in": _heads_in("num_kv_heads"),
    "q_bias": _heads_bias("num_heads"),
    "kv_bias": _heads_bias("num_kv_heads"),
    # o_proj [D, N*H] -> [N, H, D]
    "o_out": (
        lambda w, cfg: w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size),
        lambda w, cfg: w.reshape(-1, cfg.hidden_size).T,
    ),
    # a vision tower's patch embedding, a conv with stride = kernel: [D, C, P, P] -> [C*P*P, D], the
    # matrix that multiplies a patch flattened channel-major (`mllmjax.models.vision.tower`)
    "patch_in": (
        lambda w, cfg: w.reshape(w.shape[0], -1).T,
        lambda w, cfg: w.T.reshape(cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size),
    ),
}


def _flat_specs(cfg: Any) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    flat: dict[str, Any] = {}
    map_specs(lambda path, spec: flat.__setitem__(path, spec), cfg.param_specs())
    return flat


def stacked_axes(rule: Rule) -> int:
    """How many leading axes of the rule's parameter its HF name indexes: 0, 1 ({i}) or 2 ({i}, {j})."""
    return ("{i}" in rule.hf) + ("{j}" in rule.hf)


def expected_hf_tensors(
    cfg: Any, rules: Sequence[Rule] | None = None
) -> dict[str, tuple[Rule, tuple[int, ...], tuple[int, ...]]]:
    """Every HF tensor the config implies: name -> (rule, its index into the stacked parameter: (),
    (layer,) or (layer, expert), HF shape). rules: the name table (default: the family's HF_NAMES);
    cfg: a `ModelConfig`, or with rules any config that declares `param_specs()` and the fields
    its rules' kinds read."""
    flat = _flat_specs(cfg)
    stacks = cfg.layer_stacks() if hasattr(cfg, "layer_stacks") else {}
    out: dict[str, tuple[Rule, tuple[int, ...], tuple[int, ...]]] = {}
    for rule in family(cfg).HF_NAMES if rules is None else rules:
        if rule.ours not in flat:
            continue
        shape = flat[rule.ours][0]
        n = stacked_axes(rule)
        hf_shape = KINDS[rule.kind][1](np.empty(shape[n:], np.int8), cfg).shape
        # A stack of some layers only (`ModelConfig.layer_stacks`): slot s holds HF layer numbers[s].
        numbers = stacks.get(rule.ours.split("/", 1)[0])
        for index in itertools.product(*(range(size) for size in shape[:n])):
            names = dict(zip("ij", index, strict=False))
            if numbers is not None:
                names["i"] = numbers[index[0]]
            out[rule.hf.format(**names)] = (rule, index, hf_shape)
    return out


class Renamed:
    """Another source's tensors under new names, a subset of them: rename(name) is a tensor's name in
    this view, or None to leave it out. A vision-language checkpoint is one such view per part (its
    text model's tensors under the names the text family's table reads, ...)."""

    def __init__(self, source: Any, rename: Callable[[str], str | None]):
        self._source = _Source(source) if isinstance(source, Mapping) else source
        self._names: dict[str, str] = {}  # our name -> the source's
        for name in self._source.tensor_names():
            new = rename(name)
            if new is not None:
                self._names[new] = name

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._source.tensor_shape(self._names[name])

    def load(self, name: str) -> np.ndarray:
        return self._source.load(self._names[name])


class _Source:
    """Adapts a mapping name -> array to the subset of WeightSource that the loader needs."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._t = tensors

    def tensor_names(self) -> list[str]:
        return list(self._t)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def load(self, name: str) -> np.ndarray:
        return _to_numpy(self._t[name])


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            return x.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def params_from_hf(
    cfg: Any,
    source: Any,
    *,
    rules: Sequence[Rule] | None = None,
    dtype: Any = np.float32,
    shardings: Params | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> Params:
    """Build our parameter tree from HF-named tensors.

    cfg: a `ModelConfig`, or with rules another config (`expected_hf_tensors`).
    source: a WeightSource, or a mapping name -> array (numpy or torch, e.g. a state_dict).
    rules: the name table (default: the family's HF_NAMES).
    dtype: the parameter dtype. shardings: a tree of jax Shardings shaped like the params (default:
    the default device). on_tensor: called with each source name as it is consumed (for progress).
    """
    if isinstance(source, Mapping):
        source = _Source(source)
    dtype = np.dtype(dtype)
    flat_specs = _flat_specs(cfg)
    flat_shardings = flatten(shardings) if shardings is not None else {}
    expected = expected_hf_tensors(cfg, rules)
    names = [n for n in source.tensor_names() if not _IGNORED.match(n)]

    tied_head = getattr(cfg, "tie_word_embeddings", False) and "lm_head.weight" in names
    for name in names:
        if name in expected or (tied_head and name == "lm_head.weight"):
            continue
        raise WeightsError(
            f"unexpected tensor {name!r} in the source for a {cfg.family} model "
            "(the config and the weights disagree, or the architecture is not what config.json says)"
        )
    missing = [n for n in expected if n not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"missing tensor {missing[0]!r}{more} in the source")
    for name in names:
        if name in expected:
            want = expected[name][2]
            got = tuple(source.tensor_shape(name))
            if got != want:
                raise WeightsError(f"tensor {name!r} has shape {list(got)}, expected {list(want)}")

    # Each parameter is allocated on the devices (with its sharding) when its first tensor arrives, and
    # every layer is written into it in place (the buffer is donated), so host memory holds one source
    # tensor at a time and device memory never holds more than the parameters themselves.
    done: dict[str, Any] = {}
    for name in (n for n in names if n in expected):
        rule, index, _ = expected[name]
        try:
            value = KINDS[rule.kind][0](np.asarray(source.load(name)), cfg).astype(dtype, copy=False)
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(f"could not read tensor {name!r}: {e}") from e
        if not np.isfinite(value).all():
            raise WeightsError(f"tensor {name!r} contains NaN or infinite values (corrupt source?)")
        path = rule.ours
        sharding = flat_shardings.get(path)
        if not index:
            done[path] = _place(value, sharding)
        else:
            if path not in done:
                done[path] = _zeros(flat_specs[path][0], dtype, sharding)
            part = _place(value, _drop_leading_axes(sharding, len(index)))
            done[path] = _set_slice(done[path], part, *index)
        del value
        if on_tensor is not None:
            on_tensor(name)
    if tied_head:
        _check_tied(source.load("lm_head.weight"), done["embed"], dtype)
        if on_tensor is not None:
            on_tensor("lm_head.weight")
    return unflatten({p: done[p] for p in flat_specs})


def _place(value: np.ndarray, sharding: Any) -> jax.Array:
    if sharding is None:
        return jax.device_put(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _drop_leading_axes(sharding: Any, n: int) -> Any:
    """The sharding of one [layer] or [layer, expert] slice of a stacked parameter (`_set_slice` moves
    it onto the devices that hold its expert)."""
    if sharding is None:
        return None
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[n:]))


def _zeros(shape: tuple[int, ...], dtype: np.dtype, sharding: Any) -> jax.Array:
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


# The stacked buffer is donated: XLA writes the slice in place instead of copying the whole parameter.
@functools.partial(jax.jit, donate_argnums=0)
def _set_slice(stacked: jax.Array, value: jax.Array, *index: int) -> jax.Array:
    """stacked[index] = value, index a position on the leading axes ((layer,) or (layer, expert))."""
    start = (*index, *(0,) * value.ndim)
    return jax.lax.dynamic_update_slice(stacked, value.astype(stacked.dtype)[(None,) * len(index)], start)


def _check_tied(head: np.ndarray, embed: jax.Array, dtype: np.dtype) -> None:
    if not np.array_equal(np.asarray(head).astype(dtype), np.asarray(embed)):
        raise WeightsError(
            "config says tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight"
        )


def hf_tensors_from_params(
    cfg: Any, params: Params, dtype: Any = None, *, rules: Sequence[Rule] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array in HF layout) for export; a tied head is not written (HF re-ties it).
    rules: the name table (default: the family's HF_NAMES)."""
    flat = flatten(params)
    for name, (rule, index, _) in expected_hf_tensors(cfg, rules).items():
        arr = np.asarray(flat[rule.ours][index])
        out = np.ascontiguousarray(KINDS[rule.kind][1](arr, cfg))
        yield name, out if dtype is None else out.astype(dtype)
