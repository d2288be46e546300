"""What every vision-language model shares: its checkpoint's three parts, putting image features into
the text embeddings, the forward and logits, and a prompt's embeddings for the sampler.

A vision-language module (`llava`, `gemma3_vision`) supplies its own config, projector and name
tables, and two functions these call by the config's family (`registry.vision_language_models`):

    tower_features(vision, cfg, pixels, dtype)   images [N, C, H, W] -> what the projector reads
    project_features(projector, cfg, feats, dtype) -> image features [..., tokens_per_image, D_text]

Its config has `vision`, `text` (a decoder family's config), `image_token_id`, `tokens_per_image` and
`bidirectional_images`: whether a prompt's image tokens see every token of their image in the text
model (Gemma 3, HF's blockwise mask; `image_reach`) or attend causally like text (LLaVA).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllmjax.errors import BadInputError, WeightsError
from mllmjax.models import transformer
from mllmjax.models.params import Params
from mllmjax.models.vision import tower
from mllmjax.weights import table

PARTS = ("vision", "projector", "text")  # the subtrees of the params


def module(cfg: Any) -> ModuleType:
    """The vision-language module of a config (by its family)."""
    from mllmjax.models.registry import vision_language_models

    return vision_language_models()[cfg.family]


# Where each part of a checkpoint lives, in the spellings its writers use (the original llava-hf and
# Gemma 3 checkpoints, transformers 4.52+, transformers 5): (prefix, part, the part's own name for it).
_PARTS = (
    ("model.vision_tower.", "vision", ""),
    ("vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.language_model.", "text", "model."),
    ("language_model.model.", "text", "model."),
    ("language_model.lm_head.", "text", "lm_head."),
    ("lm_head.", "text", "lm_head."),
)


def part_of(name: str) -> tuple[str, str] | None:
    """(part, the tensor's name within the part's own model) of a checkpoint tensor, or None:
    'language_model.model.layers.0.mlp.up_proj.weight' -> ('text', 'model.layers.0.mlp.up_proj.weight')."""
    for prefix, part, ours in _PARTS:
        if name.startswith(prefix):
            return part, ours + name[len(prefix) :]
    return None


def _in_part(part: str, name: str) -> str | None:
    found = part_of(name)
    return found[1] if found is not None and found[0] == part else None


def params_from_hf(
    cfg: Any,
    source: Any,
    *,
    dtype: Any = np.float32,
    shardings: Params | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> Params:
    """{"vision", "projector", "text"} params from a checkpoint's HF-named tensors (a WeightSource or a
    name -> array mapping): each part through its own name table (the projector's: its module's
    `PROJECTOR_HF_NAMES`), on a view of the source that names its tensors as the part's own model does
    (`mllmjax.weights.table.Renamed`). shardings: a tree shaped like the params, or None. A tensor
    outside the three parts is a WeightsError."""
    names = list(source) if isinstance(source, Mapping) else source.tensor_names()
    stray = [n for n in names if part_of(n) is None]
    if stray:
        raise WeightsError(
            f"unexpected tensor {stray[0]!r} in a {cfg.family} checkpoint (not in its vision tower, "
            "projector or language model)"
        )
    shardings = shardings or {}
    options = dict(dtype=dtype, on_tensor=on_tensor)
    view = {part: table.Renamed(source, functools.partial(_in_part, part)) for part in PARTS}
    return {
        "vision": tower.params_from_hf(
            cfg.vision, view["vision"], shardings=shardings.get("vision"), **options
        ),
        "projector": table.params_from_hf(
            cfg.projector,
            view["projector"],
            rules=module(cfg).PROJECTOR_HF_NAMES,
            shardings=shardings.get("projector"),
            **options,
        ),
        "text": table.params_from_hf(cfg.text, view["text"], shardings=shardings.get("text"), **options),
    }


# Export writes the names of the original checkpoints (llava-hf's, Google's Gemma 3), which every
# transformers version loads (transformers 5's save_pretrained drops the tower's `vision_model.`, which
# older versions need): part -> (the prefix in the part's own names, the prefix written).
SAVED = {
    "vision": (("", "vision_tower.vision_model."),),
    "projector": (("", "multi_modal_projector."),),
    "text": (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
}


def hf_tensors_from_params(cfg: Any, params: Params, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array in HF layout) of every tensor, for export: each part through its own table
    (the text model's without a tied head, which HF ties again), under the names `SAVED` gives."""
    parts = (
        ("vision", cfg.vision, tower.HF_NAMES),
        ("projector", cfg.projector, module(cfg).PROJECTOR_HF_NAMES),
        ("text", cfg.text, None),
    )
    for part, part_cfg, rules in parts:
        for name, arr in table.hf_tensors_from_params(part_cfg, params[part], dtype, rules=rules):
            ours, written = next((o, w) for o, w in SAVED[part] if name.startswith(o))
            yield written + name[len(ours) :], arr


def load_hf(folder: str | Path, *, dtype: Any = np.float32) -> tuple[Any, Params]:
    """The config and params of an HF vision-language folder (as `save_pretrained` writes it)."""
    from mllmjax.models.registry import vision_language_of_hf
    from mllmjax.weights.hf import open_hf_folder

    source = open_hf_folder(Path(folder))
    try:
        hf = source.hf_config()
        m = vision_language_of_hf(hf)
        if m is None:
            raise WeightsError(f"{folder}: not a vision-language checkpoint")
        cfg = m.config_from_hf(hf)
        return cfg, m.params_from_hf(cfg, source, dtype=dtype)
    finally:
        source.close()


def image_features(params: Params, cfg: Any, pixels: jax.Array, dtype: Any) -> jax.Array:
    """The projected features [N, tokens_per_image, D_text] of images pixels [N, C, H, W]."""
    m = module(cfg)
    return m.project_features(params["projector"], cfg, m.tower_features(params["vision"], cfg, pixels, dtype), dtype)


def merge_image_features(
    embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_token_id: int
) -> jax.Array:
    """embeds [B, T, D] with its image tokens' rows replaced by the image features [N, P, D]: the k-th
    image token of the batch, counted row by row, takes the k-th feature row (HF's masked_scatter), so
    image n fills the n-th run of P image tokens. The count must match (`check_image_tokens`)."""
    mask = input_ids == image_token_id
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    index = jnp.cumsum(mask.reshape(-1)).reshape(mask.shape) - 1
    picked = jnp.take(flat, jnp.clip(index, 0, flat.shape[0] - 1), axis=0)
    return jnp.where(mask[..., None], picked, embeds)


def _slots(input_ids: jax.Array, image_token_id: int, prompt_len: int | None) -> jax.Array:
    """[B, T]: the image tokens that are slots (before column prompt_len, when given)."""
    mask = input_ids == image_token_id
    if prompt_len is None:
        return mask
    return mask & (jnp.arange(input_ids.shape[1]) < prompt_len)[None, :]


def merge_row_features(
    embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_token_id: int, prompt_len: int
) -> jax.Array:
    """`merge_image_features` row by row, for training batches whose rows are shuffled: embeds [B, T,
    D], input_ids [B, T], features [B, K, P, D] (row b's images, padded with unused ones to K). Only
    image tokens before column prompt_len are slots (a sampled completion may hold the image token's
    id, which the sampler embedded as a token); row b's k-th slot takes row b's k-th feature row."""
    b = input_ids.shape[0]
    mask = _slots(input_ids, image_token_id, prompt_len)
    flat = features.reshape(b, -1, features.shape[-1]).astype(embeds.dtype)
    index = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, flat.shape[1] - 1)
    picked = jnp.take_along_axis(flat, index[..., None], axis=1)
    return jnp.where(mask[..., None], picked, embeds)


def image_reach(
    cfg: Any, input_ids: jax.Array, positions: jax.Array, prompt_len: int | None = None
) -> jax.Array | None:
    """[B, T] the position up to which each token sees (`transformer.forward(reach=)`), or None when the
    model's image tokens attend causally. With `bidirectional_images`, an image token sees up to the
    last token of its run of image tokens (HF Gemma 3's blockwise mask over `token_type_ids`), every
    other token up to itself; only slots before column prompt_len count (see `merge_row_features`)."""
    if not cfg.bidirectional_images:
        return None
    t = input_ids.shape[1]
    image = _slots(input_ids, cfg.image_token_id, prompt_len)
    columns = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), image.shape)
    after = jax.lax.cummin(jnp.where(image, t, columns), axis=1, reverse=True)  # next text column
    last = jnp.clip(after - 1, 0, t - 1)
    positions = positions.astype(jnp.int32)
    return jnp.where(image, jnp.take_along_axis(positions, last, axis=1), positions)


def prompt_reach(cfg: Any, ids: Any) -> np.ndarray | None:
    """`image_reach` of one prompt's ids [T] at positions 0..T-1 (the sampler's `reach`), or None."""
    if not cfg.bidirectional_images:
        return None
    ids = np.asarray(ids, np.int32).reshape(1, -1)
    positions = np.arange(ids.shape[1], dtype=np.int32)[None]
    return np.asarray(image_reach(cfg, jnp.asarray(ids), jnp.asarray(positions)))[0]


def check_image_tokens(cfg: Any, input_ids: Any, num_images: int) -> None:
    """BadInputError unless the prompts hold exactly the image tokens the images fill (read on the
    host: the jitted forward cannot raise on what the ids hold)."""
    count = int((np.asarray(input_ids) == cfg.image_token_id).sum())
    want = num_images * cfg.tokens_per_image
    if count != want:
        raise BadInputError(
            f"the prompts hold {count} image tokens (id {cfg.image_token_id}), but {num_images} images "
            f"fill {want} ({cfg.tokens_per_image} each)"
        )


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def input_embeds(
    params: Params,
    cfg: Any,
    input_ids: jax.Array,
    pixels: jax.Array | None = None,
    *,
    compute_dtype: Any = None,
) -> jax.Array:
    """The text model's input embeddings [B, T, D] of prompts input_ids [B, T]: the token embeddings
    (with the family's multiplier) with the features of images pixels [N, C, H, W] (None: text only)
    at the image tokens."""
    text = params["text"]
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else text["embed"].dtype
    x = transformer.embed_tokens(text, cfg.text, input_ids, dtype)
    if pixels is not None:
        features = image_features(params, cfg, pixels, dtype)
        x = merge_image_features(x, input_ids, features, cfg.image_token_id)
    return x


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def forward(
    params: Params,
    cfg: Any,
    input_ids: jax.Array,
    positions: jax.Array,
    pixels: jax.Array | None = None,
    *,
    valid: jax.Array | None = None,
    compute_dtype: Any = None,
) -> jax.Array:
    """The text model's final-normed hidden states [B, T, D] of prompts input_ids [B, T] whose image
    tokens take the features of images pixels [N, C, H, W] (None: text only); positions, valid: as
    `transformer.forward` takes them. The image tokens are not counted here (`check_image_tokens`)."""
    text = params["text"]
    dtype = jnp.dtype(compute_dtype) if compute_dtype is not None else text["embed"].dtype
    x = input_embeds(params, cfg, input_ids, pixels, compute_dtype=dtype)
    hidden, _ = transformer.forward(
        text,
        cfg.text,
        None,
        positions,
        embeds=x,
        valid=valid,
        compute_dtype=dtype,
        reach=image_reach(cfg, input_ids, positions),
    )
    return hidden


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype"))
def _logits(
    params: Params,
    cfg: Any,
    input_ids: jax.Array,
    positions: jax.Array,
    pixels: jax.Array | None,
    valid: jax.Array | None,
    compute_dtype: Any,
) -> jax.Array:
    hidden = forward(params, cfg, input_ids, positions, pixels, valid=valid, compute_dtype=compute_dtype)
    return transformer.logits_from_hidden(params["text"], hidden, softcap=cfg.text.final_logit_softcap)


def logits(
    params: Params,
    cfg: Any,
    input_ids: Any,
    pixels: Any = None,
    positions: Any = None,
    valid: Any = None,
    compute_dtype: Any = None,
) -> jax.Array:
    """Full-sequence float32 logits [B, T, V] of prompts with images (see `forward`; positions default
    to 0..T-1). Checks the image tokens on the host first, so it is not for use under a trace."""
    check_image_tokens(cfg, input_ids, 0 if pixels is None else pixels.shape[0])
    if positions is None:
        shape = np.shape(input_ids)
        positions = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape)
    return _logits(params, cfg, input_ids, positions, pixels, valid, compute_dtype)


def prompt_embeds(
    params: Params, cfg: Any, ids: Any, pixels: Any = None, compute_dtype: Any = None
) -> jax.Array:
    """One prompt's input embeddings [T, D] for the sampler (`sampling.generate_embeds`, with
    `prompt_reach` of the same ids): ids [T] with its image tokens, pixels [N, C, H, W] their images
    (or None), the tower run once for them, in compute_dtype (default the params'). The image tokens
    are checked on the host first; the ids are padded to a prompt bucket so prompts of similar length
    share one compiled program."""
    from mllmjax.sampling.buckets import prompt_bucket

    ids = np.asarray(ids, np.int32).reshape(-1)
    check_image_tokens(cfg, ids, 0 if pixels is None else len(pixels))
    padded = np.full((1, prompt_bucket(len(ids))), int(cfg.image_token_id == 0), np.int32)  # no image token
    padded[0, : len(ids)] = ids
    pixels = None if pixels is None or len(pixels) == 0 else jnp.asarray(pixels)
    return input_embeds(params, cfg, padded, pixels, compute_dtype=compute_dtype)[0, : len(ids)]
