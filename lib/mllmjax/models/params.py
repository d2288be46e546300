"""Parameter trees and their one declaration: every parameter's shape and logical axis names.

A family's `param_specs(cfg)` is read by initialisation, sharding, the HF name tables, checkpoints and
the memory estimate, so none of them can drift from the others. Logical axis names ("embed",
"heads", ...) are mapped onto mesh axes by `mllmjax.sharding`; the models never see a mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

Params = dict[str, Any]


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # one logical axis name per dimension


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of an HF name table. hf: the HF tensor name, with {i} for the layer index and {j} for
    the expert index of a mixture of experts' stacked weights (`mllmjax.weights.table`); ours: our
    param path ("layers/q"); kind: the layout change between them (`mllmjax.weights.table.KINDS`)."""

    hf: str
    ours: str
    kind: str = "copy"


def is_spec(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def map_specs(
    fn: Callable[[str, ParamSpec], Any], specs: Mapping[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """Apply fn(path, spec) to every leaf of a spec tree; paths look like 'layers/q'."""
    return {
        key: fn(f"{prefix}{key}", val) if is_spec(val) else map_specs(fn, val, f"{prefix}{key}/")
        for key, val in specs.items()
    }


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as {path: leaf}, paths joined with '/'."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def decoder_specs(
    layer: Mapping[str, ParamSpec], *, vocab: int, embed: int, num_layers: int, tied: bool
) -> dict[str, Any]:
    """The spec tree of a decoder-only LM: the embedding, one layer's specs stacked on a leading
    "layers" axis, the final norm, and an LM head [vocab, embed] unless tied to the embedding."""
    layers = {name: ParamSpec((num_layers, *s.shape), ("layers", *s.axes)) for name, s in layer.items()}
    specs: dict[str, Any] = {
        "embed": ParamSpec((vocab, embed), ("vocab", "embed")),
        "final_norm": ParamSpec((embed,), ("norm",)),
        "layers": layers,
    }
    if not tied:
        specs["lm_head"] = ParamSpec((vocab, embed), ("vocab", "embed"))
    return specs


def decoder_hf_names(*extra: Rule) -> tuple[Rule, ...]:
    """The HF names every Llama-style decoder shares (embedding, norms, q/k/v/o, gate/up/down), plus a
    family's own rows. A row whose param the config lacks is skipped."""
    layer = "model.layers.{i}."
    return (
        Rule("model.embed_tokens.weight", "embed"),
        Rule("model.norm.weight", "final_norm"),
        Rule("lm_head.weight", "lm_head"),
        Rule(layer + "input_layernorm.weight", "layers/attn_norm"),
        Rule(layer + "self_attn.q_proj.weight", "layers/q", "q_in"),
        Rule(layer + "self_attn.k_proj.weight", "layers/k", "kv_in"),
        Rule(layer + "self_attn.v_proj.weight", "layers/v", "kv_in"),
        Rule(layer + "self_attn.o_proj.weight", "layers/o", "o_out"),
        Rule(layer + "post_attention_layernorm.weight", "layers/mlp_norm"),
        Rule(layer + "mlp.gate_proj.weight", "layers/gate", "transpose"),
        Rule(layer + "mlp.up_proj.weight", "layers/up", "transpose"),
        Rule(layer + "mlp.down_proj.weight", "layers/down", "transpose"),
        *extra,
    )


QKV_BIAS_HF_NAMES = (
    Rule("model.layers.{i}.self_attn.q_proj.bias", "layers/q_bias", "q_bias"),
    Rule("model.layers.{i}.self_attn.k_proj.bias", "layers/k_bias", "kv_bias"),
    Rule("model.layers.{i}.self_attn.v_proj.bias", "layers/v_bias", "kv_bias"),
)
