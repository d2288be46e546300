"""LoRA: low-rank adapters trained on a frozen base model (Hu et al., arXiv 2106.09685).

A target weight w [*in, *out] (per layer; stacked on the layer axis like every layer param) gets
a [*in, r] and b [r, *out], and the policy's weight is w + (alpha / r) a b. Only a and b are trained:
gradients, optimizer state and the gradient accumulator exist for them alone, and the KL reference is
the base itself (adapters off), so no second copy of the weights is kept whatever --beta is.

Design decisions:
- The adapters are a parameter tree of their own, {"layers": {target: {"a", "b"}}}, with `ParamSpec`s
  (`adapter_specs`) whose logical axes are the base weight's plus "lora" (replicated), so sharding,
  checkpoints and the memory estimate treat them like any params.
- `attach` puts the adapters next to the base as `blocks.adapters.Adapted` weights, which the linear
  layers run as x w + scale (x a) b: nothing merged in training, on accelerators or in the sampler.
  The CPU decode loop merges them into the transposed copy it makes anyway (`blocks.cpu`), and
  `merge` gives plain merged params for export, eval of a checkpoint, and multi-host decoding.
- Initialisation as PEFT's default: a ~ kaiming-uniform (bound 1 / sqrt(fan_in)), b = 0, so a fresh
  adapter leaves the model's outputs exactly as they were.
- Dropout (PEFT's lora_dropout) is applied to the adapter's input in training forwards only; it is
  refused on the experts of a mixture of experts, whose adapters are merged per layer.
- Targets are weights of "layers". A Qwen3-MoE with dense MLPs among its expert layers keeps its MLPs
  in stacks of their own (`ModelConfig.layer_stacks`): there "all" is the attention projections, and
  an MLP target is refused.
- A LoRA checkpoint holds the adapters (+ optimizer state) and, in mllmjax.json, "lora": its config,
  the base checkpoint's path and the base's content hash (`content_hash`: a hash of its recorded
  per-array checksums); loading refuses a base whose hash differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllmjax.errors import BadInputError
from mllmjax.models.blocks.adapters import Adapted
from mllmjax.models.blocks.cpu import input_dims
from mllmjax.models.config import ModelConfig
from mllmjax.models.params import Params, ParamSpec, map_specs
from mllmjax.settings import DEFAULTS

# Matrices that may carry adapters: attention and MLP projections, and a mixture of experts' experts.
# The router is left out (PEFT and the MoE LoRA recipes keep it frozen).
TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "experts_gate", "experts_up", "experts_down")
EXPERT_TARGETS = ("experts_gate", "experts_up", "experts_down")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """rank 0 = off. targets: names of layer params (`TARGETS`); empty = all the model has."""

    rank: int = DEFAULTS.lora_rank
    alpha: float = DEFAULTS.lora_alpha
    dropout: float = DEFAULTS.lora_dropout
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise BadInputError(f"lora rank must be an integer >= 1 (or 0 for off), got {self.rank!r}")
        if not self.alpha > 0:
            raise BadInputError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise BadInputError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise BadInputError(
                f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)} (or all)"
            )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
        }


def parse_targets(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """'all' / '' / None -> () (every target the model has); 'q,v' -> ('q', 'v')."""
    if spec is None:
        return ()
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    parts = [p for p in parts if p]
    if parts in ([], ["all"]):
        return ()
    return tuple(dict.fromkeys(parts))


def from_settings(settings: Any) -> LoraConfig:
    return LoraConfig(
        rank=settings.lora_rank,
        alpha=settings.lora_alpha,
        dropout=settings.lora_dropout,
        targets=parse_targets(settings.lora_targets),
    )


def resolved_targets(model_cfg: ModelConfig, cfg: LoraConfig) -> tuple[str, ...]:
    """The targets of cfg this model has (all of them when cfg names none); a named target the model
    lacks is an error."""
    specs = model_cfg.param_specs()
    layer = specs["layers"]
    have = [t for t in TARGETS if t in layer]
    if not cfg.targets:
        chosen = tuple(have)
    else:
        missing = [t for t in cfg.targets if t not in layer]
        apart = [t for t in missing if any(t in specs[s] for s in model_cfg.layer_stacks())]
        if apart:
            raise BadInputError(
                f"LoRA target {apart[0]!r} is not supported on a model with mixed dense and MoE layers "
                f"(its MLPs are stacked apart from the attention); it takes {', '.join(have)}"
            )
        if missing:
            raise BadInputError(
                f"LoRA target {missing[0]!r} is not a weight of this {model_cfg.family} model; "
                f"it has {', '.join(have)}"
            )
        chosen = tuple(t for t in TARGETS if t in cfg.targets)
    if cfg.dropout > 0 and any(t in EXPERT_TARGETS for t in chosen):
        raise BadInputError(
            "--lora-dropout is not supported on expert adapters (they are merged per layer); "
            "use --lora-dropout 0 or --lora-targets without experts_*"
        )
    return chosen


def _split_dims(spec: ParamSpec) -> tuple[int, int]:
    """(lead dims, input dims) of one layer's weight spec: the expert axis leads, then the input."""
    lead = 1 if spec.axes and spec.axes[0] == "experts" else 0
    rest = ParamSpec(spec.shape[lead:], spec.axes[lead:])
    n_in = input_dims(rest)
    if n_in is None:
        raise BadInputError(f"a weight with axes {spec.axes} cannot carry a LoRA adapter")
    return lead, n_in


def adapter_specs(model_cfg: ModelConfig, cfg: LoraConfig) -> Params:
    """{"layers": {target: {"a": [L, *lead, *in, r], "b": [L, *lead, r, *out]}}}, with logical axes."""
    layer = model_cfg.param_specs()["layers"]
    out: dict[str, Any] = {}
    for name in resolved_targets(model_cfg, cfg):
        spec = layer[name]
        own = ParamSpec(spec.shape[1:], spec.axes[1:])
        lead, n_in = _split_dims(own)
        k = 1 + lead + n_in  # layers, lead and input dims
        out[name] = {
            "a": ParamSpec((*spec.shape[:k], cfg.rank), (*spec.axes[:k], "lora")),
            "b": ParamSpec(
                (*spec.shape[: 1 + lead], cfg.rank, *spec.shape[k:]),
                (*spec.axes[: 1 + lead], "lora", *spec.axes[k:]),
            ),
        }
    return {"layers": out}


def init_adapters(model_cfg: ModelConfig, cfg: LoraConfig, rng: jax.Array, shardings: Any = None) -> Params:
    """Fresh float32 adapters: a ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt 5)),
    b = 0. shardings: a tree like the specs (`sharding.spec_shardings`) to create them placed."""
    specs = adapter_specs(model_cfg, cfg)
    names = sorted(specs["layers"])
    keys = dict(zip(names, jax.random.split(rng, max(len(names), 1)), strict=False))

    def make(path: str, spec: ParamSpec) -> jax.Array:
        _, target, which = path.split("/")
        if which == "b":
            return jnp.zeros(spec.shape, jnp.float32)
        own = ParamSpec(spec.shape[1:], spec.axes[1:])
        lead = 1 if own.axes[0] == "experts" else 0
        fan_in = math.prod(own.shape[lead:-1])
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(keys[target], spec.shape, jnp.float32, -bound, bound)

    if shardings is None:
        return map_specs(make, specs)
    made = jax.jit(lambda: map_specs(make, specs), out_shardings=shardings)
    return made()


def attach(
    base: Params, adapters: Params, cfg: LoraConfig, model_cfg: ModelConfig, key: Any = None
) -> Params:
    """The policy's params: base with each target weight an `Adapted` (w, a, b). key: a raw PRNG key
    [2] for dropout (training forwards; None: no dropout). Works on stacked layers and on per-layer
    tuples (`blocks.cpu.split_layers`) alike."""
    layer_spec = model_cfg.param_specs()["layers"]
    targets = adapters["layers"]
    rate = cfg.dropout if key is not None else 0.0

    def one(lp: Params, ad: Params, keys: Any) -> Params:
        out = dict(lp)
        for i, name in enumerate(sorted(ad)):
            spec = layer_spec[name]
            lead, n_in = _split_dims(ParamSpec(spec.shape[1:], spec.axes[1:]))
            k = None if keys is None else keys[..., i, :]
            out[name] = Adapted(
                lp[name], ad[name]["a"], ad[name]["b"], k, scale=cfg.scale, n_in=n_in, lead=lead, rate=rate
            )
        return out

    per_layer = targets[0] if isinstance(targets, (tuple, list)) else targets
    n_targets = len(per_layer)

    def layer_keys(n_layers: int) -> Any:
        """[n_layers, n_targets, 2] raw keys: one per layer and target, whatever the layout."""
        if key is None or rate <= 0:
            return None
        k = jax.random.wrap_key_data(key)
        shape = (n_layers, n_targets)
        return jax.random.key_data(jax.random.split(k, math.prod(shape)).reshape(shape))

    layers = base["layers"]
    if isinstance(layers, (tuple, list)):
        keys = layer_keys(len(layers))
        new = tuple(
            one(lp, ad, None if keys is None else keys[i])
            for i, (lp, ad) in enumerate(zip(layers, targets_per_layer(targets, len(layers)), strict=True))
        )
        return {**base, "layers": new}
    return {**base, "layers": one(layers, targets, layer_keys(model_cfg.num_layers))}


def targets_per_layer(targets: Any, n: int) -> tuple[Params, ...]:
    """Adapters split per layer, unless they already are (a tuple of per-layer trees)."""
    if isinstance(targets, (tuple, list)):
        return tuple(targets)
    return tuple(jax.tree.map(lambda x, i=i: x[i], targets) for i in range(n))


def merge(base: Params, adapters: Params, cfg: LoraConfig, model_cfg: ModelConfig) -> Params:
    """Plain params with every target weight replaced by w + scale a b (in w's dtype)."""
    attached = attach(base, adapters, cfg, model_cfg)
    merge_one = jax.jit(lambda w: w.merged())
    layers = {name: merge_one(w) if isinstance(w, Adapted) else w for name, w in attached["layers"].items()}
    return {**base, "layers": layers}


def has_adapters(params: Params) -> bool:
    return any(
        isinstance(x, Adapted) for x in jax.tree.leaves(params, is_leaf=lambda n: isinstance(n, Adapted))
    )


def merged_if_adapted(params: Params) -> Params:
    """params with any `Adapted` weight merged (for paths that reshard or export plain arrays)."""
    if not has_adapters(params):
        return params
    return jax.tree.map(
        lambda x: x.merged() if isinstance(x, Adapted) else x,
        params,
        is_leaf=lambda n: isinstance(n, Adapted),
    )


def adapter_count(adapters: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


# ----------------------------------------------------------------------------------------- checkpoints
def content_hash(meta: dict[str, Any], params: Params | None = None) -> str:
    """A checkpoint's content hash: sha256 of its per-array parameter checksums (recorded in its
    mllmjax.json at write time; computed from `params` for a checkpoint written before checksums)."""
    from mllmjax import checksums

    sums = meta.get("checksums", {}).get("params") if isinstance(meta.get("checksums"), dict) else None
    if not isinstance(sums, dict):
        if params is None:
            raise BadInputError("the base checkpoint records no checksums; pass its params to hash them")
        sums = checksums.tree_checksums(params)
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()


def meta_entry(cfg: LoraConfig, model_cfg: ModelConfig, base_path: str, base_hash: str) -> dict[str, Any]:
    """The "lora" entry of a LoRA checkpoint's mllmjax.json."""
    return {
        **cfg.to_json(),
        "targets": list(resolved_targets(model_cfg, cfg)),
        "base": base_path,
        "base_hash": base_hash,
    }


def config_from_meta(entry: dict[str, Any]) -> LoraConfig:
    return LoraConfig(
        rank=int(entry["rank"]),
        alpha=float(entry["alpha"]),
        dropout=float(entry.get("dropout", 0.0)),
        targets=tuple(entry.get("targets", ())),
    )


def same_adapters(a: LoraConfig, b: LoraConfig, model_cfg: ModelConfig) -> bool:
    """Whether two configs describe adapters of one shape and scale (dropout may differ)."""
    return (a.rank, a.alpha, resolved_targets(model_cfg, a)) == (
        b.rank,
        b.alpha,
        resolved_targets(model_cfg, b),
    )


# ----------------------------------------------------------------------------------------- PEFT export
PEFT_PREFIX = "base_model.model."


# A vision-language model's language model, as transformers 5 names its modules in memory (where PEFT
# attaches adapters): `model.language_model.layers.{i}...` for LLaVA and Gemma 3 alike.
VLM_TEXT_MODULES = ("model.", "model.language_model.")


def peft_tensors(
    model_cfg: ModelConfig,
    cfg: LoraConfig,
    adapters: Params,
    dtype: Any = np.float32,
    rename: tuple[str, str] | None = None,
) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """(PEFT tensors, target module names): per layer and target, lora_A [r, in] and lora_B [out, r]
    under HF's module name (from the family's name table), in HF's input and output orders: our input
    dims flatten to HF's in_features and our output dims to its out_features, as the table's layouts
    do for the weights themselves. rename (old, new): module names starting with old start with new
    instead (a vision-language model's language model: `VLM_TEXT_MODULES`)."""
    from mllmjax.models.registry import family

    rules = {rule.ours: rule for rule in family(model_cfg).HF_NAMES}
    targets = resolved_targets(model_cfg, cfg)
    experts = [t for t in targets if t in EXPERT_TARGETS]
    if experts:
        raise BadInputError(
            f"PEFT cannot load adapters on a mixture of experts' experts ({experts[0]}); "
            "export the merged weights with --merge"
        )
    tensors: list[tuple[str, np.ndarray]] = []
    modules: list[str] = []
    for name in targets:
        hf = rules[f"layers/{name}"].hf
        if not hf.endswith(".weight"):
            raise BadInputError(f"no HF module for LoRA target {name!r}")
        module = hf[: -len(".weight")]
        modules.append(module.rsplit(".", 1)[-1])
        if rename is not None and module.startswith(rename[0]):
            module = rename[1] + module[len(rename[0]) :]
        a_all = np.asarray(adapters["layers"][name]["a"], np.float32)
        b_all = np.asarray(adapters["layers"][name]["b"], np.float32)
        for i in range(model_cfg.num_layers):
            a, b = a_all[i], b_all[i]
            r = a.shape[-1]
            lora_a = np.ascontiguousarray(a.reshape(-1, r).T).astype(dtype)
            lora_b = np.ascontiguousarray(b.reshape(r, -1).T).astype(dtype)
            prefix = PEFT_PREFIX + module.format(i=i)
            tensors += [(f"{prefix}.lora_A.weight", lora_a), (f"{prefix}.lora_B.weight", lora_b)]
    return tensors, sorted(set(modules))


def peft_config(
    cfg: LoraConfig, modules: Sequence[str], base: str, *, within: str | None = None
) -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA adapter with our config. within: the module names are those
    under this prefix only (a vision-language model's language model, whose tower has modules of the
    same short names): target_modules is then PEFT's regular expression over full module names."""
    targets: list[str] | str = list(modules)
    if within is not None:
        targets = rf"{re.escape(within)}.*\.({'|'.join(map(re.escape, modules))})"
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
