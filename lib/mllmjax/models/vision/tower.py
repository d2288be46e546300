"""Vision towers: the ViT encoders of CLIP and SigLIP, as vision-language models use them.

    x = patches(image) W + b                 a conv with stride = kernel = P, as one matrix product
    x = [cls; x] + positions                 CLIP only: a learned class token before the patches
    x = LayerNorm(x)                         CLIP only ("pre_layrnorm")
    x = x + Attention(LayerNorm(x))          bidirectional multi-head attention, every linear biased
    x = x + MLP(LayerNorm(x))                fc1, hidden_act (CLIP: quick_gelu, SigLIP: gelu tanh), fc2

`hidden_states` returns the input of the first layer and every layer's output, stacked: HF's
`output_hidden_states`, from which a vision-language model selects its `vision_feature_layer`. HF's
`last_hidden_state` is the last of them, through `post_layernorm` for SigLIP (`last_hidden_state`).
The pooled outputs (CLIP's class token through its `post_layernorm`, SigLIP's attention-pooling head)
are not computed: no vision-language model here reads them. Their tensors are still params (CLIP's
`post_norm`, SigLIP's `head`, the latter in HF's layout), so a checkpoint holds every tensor of its
source and export writes them back. Images must have the configured size (no interpolation of the
position embeddings).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mllmjax.errors import UnsupportedModelError
from mllmjax.models.blocks.activations import ACTIVATIONS
from mllmjax.models.blocks.attention import bidirectional_attention
from mllmjax.models.blocks.cpu import dense
from mllmjax.models.blocks.linear import project, project_out
from mllmjax.models.blocks.mlp import plain_mlp
from mllmjax.models.blocks.norms import layer_norm
from mllmjax.models.params import Params, ParamSpec, Rule
from mllmjax.models.transformer import cast_layer
from mllmjax.weights import table

_POSITIVE = (
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_channels",
    "image_size",
    "patch_size",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """A ViT encoder; what differs between CLIP and SigLIP is class-level (the subclasses below).
    Defaults are the HF config classes' own, so a `vision_config` saved without its default values
    reads the same."""

    family: ClassVar[str] = ""  # the tower's name in messages, set by each subclass
    model_type: ClassVar[str] = ""  # the HF config's model_type
    class_token: ClassVar[bool] = False  # a learned class embedding before the patches
    pre_norm: ClassVar[bool] = False  # a LayerNorm on the embeddings before the first layer
    # HF's last_hidden_state is the last layer's output through `post_norm` (every tower has its
    # params; CLIP's normalise only the pooled class token, which is not computed here)
    post_norm: ClassVar[bool] = False
    patch_bias: ClassVar[bool] = False  # the patch embedding's conv has a bias

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    use_head: bool = False  # SigLIP's attention-pooling head (`vision_use_head`): kept, not run
    patch_size: int
    layer_norm_eps: float
    hidden_act: str

    def __post_init__(self) -> None:
        if not self.family:
            raise TypeError("VisionConfig is the base of the tower configs; build one with a tower's class")
        for name in _POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise UnsupportedModelError(f"vision {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise UnsupportedModelError(
                f"vision hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_heads})"
            )
        if self.patch_size > self.image_size:
            raise UnsupportedModelError(f"patch_size {self.patch_size} exceeds image_size {self.image_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"vision hidden_act {self.hidden_act!r} is not supported (only {', '.join(ACTIVATIONS)})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side: the conv drops the rows and columns past grid * patch_size, as HF's does."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Tokens per image: the patches, and the class token if there is one."""
        return self.grid**2 + self.class_token

    def param_specs(self) -> dict[str, Any]:
        return param_specs(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipVisionConfig(VisionConfig):
    family: ClassVar[str] = "clip_vision"
    model_type: ClassVar[str] = "clip_vision_model"
    class_token: ClassVar[bool] = True
    pre_norm: ClassVar[bool] = True
    patch_size: int = 32
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiglipVisionConfig(VisionConfig):
    family: ClassVar[str] = "siglip_vision"
    model_type: ClassVar[str] = "siglip_vision_model"
    post_norm: ClassVar[bool] = True
    patch_bias: ClassVar[bool] = True
    use_head: bool = True
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"


TOWERS: dict[str, type[VisionConfig]] = {c.model_type: c for c in (ClipVisionConfig, SiglipVisionConfig)}

# HF config key -> our field (the keys a tower reads; the others do not change its forward)
_HF_KEYS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_channels": "num_channels",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_act": "hidden_act",
}


def config_from_hf(hf: dict[str, Any]) -> VisionConfig:
    """The tower config of an HF vision config dict (a CLIPVisionConfig or SiglipVisionConfig, as in a
    LLaVA config.json's `vision_config`); UnsupportedModelError on anything we would get wrong."""
    model_type = hf.get("model_type")
    if model_type not in TOWERS:
        raise UnsupportedModelError(
            f"vision tower {model_type!r} is not supported; supported: {', '.join(TOWERS)}"
        )
    fields = {ours: hf[key] for key, ours in _HF_KEYS.items() if hf.get(key) is not None}
    for key in ("image_size", "patch_size"):
        if isinstance(fields.get(key), (list, tuple)):  # HF allows [h, w]; its embeddings only read ints
            raise UnsupportedModelError(
                f"vision {key} {fields[key]!r}: only a square size (an int) is supported"
            )
    if "layer_norm_eps" in fields:
        fields["layer_norm_eps"] = float(fields["layer_norm_eps"])
    if model_type == SiglipVisionConfig.model_type and hf.get("vision_use_head") is not None:
        fields["use_head"] = bool(hf["vision_use_head"])
    return TOWERS[model_type](**fields)


def param_specs(cfg: VisionConfig) -> dict[str, Any]:
    """The patch embedding [C*P*P, D] (a patch flattened channel-major, as the conv weight is), the
    position embeddings [tokens, D], the optional class token and pre-norm, the post-norm, the stacked
    layers, and SigLIP's pooling head (`use_head`: HF's layout, replicated; no forward here reads it)."""
    d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    norm = ParamSpec((d,), ("norm",))
    # Multi-head attention: k and v have as many heads as q, so all three take the q layout.
    layer: dict[str, ParamSpec] = {
        "attn_norm": norm,
        "attn_norm_bias": norm,
        **{name: ParamSpec((d, n, h), ("embed", "heads", "head_dim")) for name in ("q", "k", "v")},
        **{f"{name}_bias": ParamSpec((n, h), ("heads", "head_dim")) for name in ("q", "k", "v")},
        "o": ParamSpec((n, h, d), ("heads", "head_dim", "embed")),
        "o_bias": norm,
        "mlp_norm": norm,
        "mlp_norm_bias": norm,
        "fc1": ParamSpec((d, f), ("embed", "mlp")),
        "fc1_bias": ParamSpec((f,), ("mlp",)),
        "fc2": ParamSpec((f, d), ("mlp", "embed")),
        "fc2_bias": norm,
    }
    specs: dict[str, Any] = {
        "patch": ParamSpec((cfg.num_channels * cfg.patch_size**2, d), (None, "embed")),
        "positions": ParamSpec((cfg.num_positions, d), (None, "embed")),
        "layers": {k: ParamSpec((cfg.num_layers, *s.shape), ("layers", *s.axes)) for k, s in layer.items()},
    }
    if cfg.patch_bias:
        specs["patch_bias"] = norm
    if cfg.class_token:
        specs["class_embed"] = norm
    if cfg.pre_norm:
        specs.update(pre_norm=norm, pre_norm_bias=norm)
    specs.update(post_norm=norm, post_norm_bias=norm)
    if cfg.use_head:
        # torch's nn.MultiheadAttention (q, k, v in one in_proj) and a SigLIP MLP, as HF stores them
        specs["head"] = {
            "probe": ParamSpec((1, 1, d), (None, None, None)),
            "in_proj": ParamSpec((3 * d, d), (None, None)),
            "in_proj_bias": ParamSpec((3 * d,), (None,)),
            "out_proj": ParamSpec((d, d), (None, None)),
            "out_proj_bias": ParamSpec((d,), (None,)),
            "norm": ParamSpec((d,), (None,)),
            "norm_bias": ParamSpec((d,), (None,)),
            "fc1": ParamSpec((f, d), (None, None)),
            "fc1_bias": ParamSpec((f,), (None,)),
            "fc2": ParamSpec((d, f), (None, None)),
            "fc2_bias": ParamSpec((d,), (None,)),
        }
    return specs


# Names relative to the tower (transformers 5's CLIPVisionModel / SiglipVisionModel state_dict); a row
# whose param the config lacks is skipped (CLIP has no patch bias or pooling head, SigLIP no class
# token or pre-norm).
_LAYER = "encoder.layers.{i}."
HF_NAMES: tuple[Rule, ...] = (
    Rule("embeddings.patch_embedding.weight", "patch", "patch_in"),
    Rule("embeddings.patch_embedding.bias", "patch_bias"),
    Rule("embeddings.class_embedding", "class_embed"),
    Rule("embeddings.position_embedding.weight", "positions"),
    Rule("pre_layrnorm.weight", "pre_norm"),
    Rule("pre_layrnorm.bias", "pre_norm_bias"),
    Rule("post_layernorm.weight", "post_norm"),
    Rule("post_layernorm.bias", "post_norm_bias"),
    Rule(_LAYER + "layer_norm1.weight", "layers/attn_norm"),
    Rule(_LAYER + "layer_norm1.bias", "layers/attn_norm_bias"),
    *(Rule(_LAYER + f"self_attn.{x}_proj.weight", f"layers/{x}", "q_in") for x in "qkv"),
    *(Rule(_LAYER + f"self_attn.{x}_proj.bias", f"layers/{x}_bias", "q_bias") for x in "qkv"),
    Rule(_LAYER + "self_attn.out_proj.weight", "layers/o", "o_out"),
    Rule(_LAYER + "self_attn.out_proj.bias", "layers/o_bias"),
    Rule(_LAYER + "layer_norm2.weight", "layers/mlp_norm"),
    Rule(_LAYER + "layer_norm2.bias", "layers/mlp_norm_bias"),
    Rule(_LAYER + "mlp.fc1.weight", "layers/fc1", "transpose"),
    Rule(_LAYER + "mlp.fc1.bias", "layers/fc1_bias"),
    Rule(_LAYER + "mlp.fc2.weight", "layers/fc2", "transpose"),
    Rule(_LAYER + "mlp.fc2.bias", "layers/fc2_bias"),
    Rule("head.probe", "head/probe"),
    Rule("head.attention.in_proj_weight", "head/in_proj"),
    Rule("head.attention.in_proj_bias", "head/in_proj_bias"),
    Rule("head.attention.out_proj.weight", "head/out_proj"),
    Rule("head.attention.out_proj.bias", "head/out_proj_bias"),
    Rule("head.layernorm.weight", "head/norm"),
    Rule("head.layernorm.bias", "head/norm_bias"),
    Rule("head.mlp.fc1.weight", "head/fc1"),
    Rule("head.mlp.fc1.bias", "head/fc1_bias"),
    Rule("head.mlp.fc2.weight", "head/fc2"),
    Rule("head.mlp.fc2.bias", "head/fc2_bias"),
)


def tower_name(name: str) -> str:
    """A tower tensor's name relative to the tower: without the `vision_model.` of checkpoints written
    before transformers 5."""
    return name.removeprefix("vision_model.")


def params_from_hf(
    cfg: VisionConfig,
    source: Any,
    *,
    dtype: Any = np.float32,
    shardings: Params | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> Params:
    """The tower's params from a CLIPVisionModel / SiglipVisionModel's HF-named tensors (a WeightSource
    or a name -> array mapping), through `HF_NAMES` (`mllmjax.weights.table.params_from_hf`)."""
    view = table.Renamed(source, tower_name)
    return table.params_from_hf(
        cfg, view, rules=HF_NAMES, dtype=dtype, shardings=shardings, on_tensor=on_tensor
    )


def embed_images(cfg: VisionConfig, params: Params, pixels: jax.Array, dtype: Any) -> jax.Array:
    """pixels [N, C, H, W] (H = W = image_size) -> the first layer's input [N, tokens, D]: each patch
    flattened channel-major times the patch matrix (the conv), the class token, the position
    embeddings, the pre-norm."""
    n, c, height, width = pixels.shape
    if (c, height, width) != (cfg.num_channels, cfg.image_size, cfg.image_size):
        raise ValueError(
            f"pixel_values of shape {pixels.shape}: the tower takes [N, {cfg.num_channels}, "
            f"{cfg.image_size}, {cfg.image_size}]"
        )
    g, p = cfg.grid, cfg.patch_size
    patches = pixels[:, :, : g * p, : g * p].reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
    x = dense(patches.reshape(n, g * g, c * p * p).astype(dtype), params["patch"].astype(dtype))
    if cfg.patch_bias:
        x = x + params["patch_bias"].astype(dtype)
    if cfg.class_token:
        cls = jnp.broadcast_to(params["class_embed"].astype(dtype), (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
    x = x + params["positions"].astype(dtype)
    if cfg.pre_norm:
        x = layer_norm(x, params["pre_norm"], params["pre_norm_bias"], cfg.layer_norm_eps)
    return x


def block(cfg: VisionConfig, p: Params, x: jax.Array) -> jax.Array:
    """One encoder layer on x [N, tokens, D]."""
    eps = cfg.layer_norm_eps
    h = layer_norm(x, p["attn_norm"], p["attn_norm_bias"], eps)
    q = project(h, p["q"]) + p["q_bias"]
    k = project(h, p["k"]) + p["k_bias"]
    v = project(h, p["v"]) + p["v_bias"]
    x = x + project_out(bidirectional_attention(q, k, v), p["o"]) + p["o_bias"]
    h = layer_norm(x, p["mlp_norm"], p["mlp_norm_bias"], eps)
    return x + plain_mlp(h, p["fc1"], p["fc1_bias"], p["fc2"], p["fc2_bias"], cfg.hidden_act)


@functools.partial(jax.jit, static_argnames=("cfg", "depth", "compute_dtype"))
def hidden_states(
    params: Params,
    cfg: VisionConfig,
    pixels: jax.Array,
    *,
    depth: int | None = None,
    compute_dtype: Any = None,
) -> jax.Array:
    """HF's hidden states [depth + 1, N, tokens, D] of images pixels [N, C, H, W]: the first layer's
    input, then the output of each of the first `depth` layers (default all), a scan over them.

    A vision-language model that reads an earlier layer passes the depth it needs, so the layers after
    it are not run. compute_dtype: the dtype of the activations and matmuls (default the params');
    norms and softmax are float32 whatever it is."""
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else params["patch"].dtype
    x = embed_images(cfg, params, pixels, dtype)
    layers = params["layers"]
    if depth is not None:
        layers = jax.tree.map(lambda w: w[:depth], layers)

    def body(x: jax.Array, lp: Params) -> tuple[jax.Array, jax.Array]:
        x = block(cfg, cast_layer(lp, dtype), x)
        return x, x

    _, outs = jax.lax.scan(body, x, layers)
    return jnp.concatenate([x[None], outs], axis=0)


def last_hidden_state(cfg: VisionConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """HF's `last_hidden_state` from `hidden_states` over all layers: the last layer's output, through
    `post_layernorm` for SigLIP (CLIP normalises only its pooled class token, which is not computed)."""
    x = hidden[-1]
    if not cfg.post_norm:
        return x
    return layer_norm(x, params["post_norm"], params["post_norm_bias"], cfg.layer_norm_eps)


def feature_index(cfg: VisionConfig, layer: int) -> int:
    """HF's index into the hidden states, `vision_feature_layer`, as a non-negative one (0: the first
    layer's input, num_layers: the last layer's output); UnsupportedModelError if out of range."""
    count = cfg.num_layers + 1
    if not -count <= layer < count:
        raise UnsupportedModelError(
            f"vision_feature_layer {layer} is out of range for a tower of {cfg.num_layers} layers"
        )
    return layer % count
