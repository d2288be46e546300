"""Training a vision-language checkpoint (LLaVA, Gemma 3 with vision) on scored rollouts with images
(schema mllmjax.rollout/2; text-only /1 records too).

Design decisions:
- What trains: the language model always, the projector by default (`--no-train-projector` freezes
  it), the vision tower only with `--train-vision`. The trained parts are the state's params, so
  gradients, the optimizer state and the accumulator exist for them alone; the frozen parts ride
  beside them as the trainer's `base` (an argument of every jitted function, never donated), as a
  LoRA run's frozen base does. The checkpoint written is the whole model again.
- A frozen tower's output (the projector's input) is computed once per batch, before the reference
  log-probs and the epochs (`VisionTrainer.prepare`), outside any gradient; a trained tower runs in
  every forward on the batch's pixels.
- Each row carries its own images (`Batch.pixels` [B, K, C, H, W], padded to the most images a row
  has), so shuffled minibatches and micro-batches keep them with their rows; a row's prompt image
  tokens take its images' features in order (`vlm.merge_row_features`); Gemma 3's see their whole image
  (`vlm.image_reach`). A completion token that happens to be the image token's id stays a token, as
  the sampler embedded it.
- The pixels are the checkpoint's own HF processor's, made from the record's prompt text and image
  files exactly as rollout made them (`mllmjax.images.processor_inputs`); the ids it gives must be the
  record's prompt_ids, and each record's prompt must hold as many image tokens as its images fill.
  Every image's SHA-256 is checked first (`records.verify_images`).
- LoRA (--lora-rank) puts its adapters on the language model alone, as PEFT's LoRA of a VLM's language
  model does: the tower and the projector stay frozen with the base (--train-vision is refused with
  it, --train-projector does not apply), the state's params are the adapters, and the checkpoint holds
  them on the base, as a text LoRA checkpoint does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mllmjax.errors import BadInputError
from mllmjax.lora import attach
from mllmjax.models.params import Params
from mllmjax.models.transformer import embed_tokens, join_params, split_params
from mllmjax.models.vision import vlm
from mllmjax.records import CONTINUATION_KEY, RolloutRecord
from mllmjax.trainer import Batch, TrainConfig, Trainer, TrainState, validate_batch


def trained_parts(cfg: TrainConfig) -> tuple[str, ...]:
    """The parts of a vision-language model's params ({"vision", "projector", "text"}) that `cfg` trains
    in full, in order: none with LoRA, whose adapters train on the frozen language model."""
    if cfg.lora.enabled:
        return ()
    on = {"vision": cfg.train_vision, "projector": cfg.train_projector, "text": True}
    return tuple(part for part in vlm.PARTS if on[part])


def split_trainable(params: Params, parts: Sequence[str]) -> tuple[Params, Params]:
    """(the trained parts, the frozen ones) of a vision-language model's params."""
    return (
        {k: v for k, v in params.items() if k in parts},
        {k: v for k, v in params.items() if k not in parts},
    )


def check_lora(cfg: TrainConfig, ckpt: Any) -> None:
    """BadInputError for --train-vision with LoRA: the adapters are the language model's alone."""
    if cfg.lora.enabled and cfg.train_vision:
        raise BadInputError(
            f"{ckpt} is a vision-language checkpoint: with --lora-rank the adapters train on its language "
            "model and the tower stays frozen; drop --train-vision (or --lora-rank to train it in full)"
        )


class VisionTrainer(Trainer):
    """The `Trainer` of a vision-language model: the state's params are the trained parts
    (`trained_parts`), `frozen` the others; the forward runs the language model from its input
    embeddings with the image features in place. ref_params: the whole starting model (beta > 0).
    With LoRA the state's params are the language model's adapters and `frozen` the whole model (the
    base, which is the KL reference too)."""

    def __init__(
        self,
        model_cfg: Any,
        cfg: TrainConfig,
        *,
        frozen: Params,
        ref_params: Params | None = None,
        donate: bool = False,
        mesh: jax.sharding.Mesh | None = None,
    ):
        check_lora(cfg, "the model")
        lora_base = frozen if cfg.lora.enabled else None
        super().__init__(model_cfg, cfg, ref_params=ref_params, base=lora_base, donate=donate, mesh=mesh)
        self.parts = trained_parts(cfg)
        missing = [p for p in vlm.PARTS if p not in self.parts and p not in frozen]
        if missing:
            raise BadInputError(f"the frozen params lack the {', '.join(missing)}")
        self.base = {k: frozen[k] for k in vlm.PARTS if k not in self.parts}
        self._features_jit = jax.jit(self._tower_features)

    def full_params(self, params: Params) -> Params:
        """The whole model's params: the trained parts `params` with the frozen ones."""
        return {k: params[k] if k in params else self.base[k] for k in vlm.PARTS}

    # --------------------------------------------------------------------------- frozen tower
    def _dtype(self, params: Params) -> Any:
        return self._compute_dtype or jax.tree.leaves(params)[0].dtype

    def _tower_features(self, vision: Params, pixels: jax.Array) -> jax.Array:
        """The projector's input [B, K, P, F] of pixels [B, K, C, H, W]."""
        b, k = pixels.shape[:2]
        feats = vlm.module(self.model_cfg).tower_features(
            vision, self.model_cfg, pixels.reshape(b * k, *pixels.shape[2:]), self._dtype(vision)
        )
        return feats.reshape(b, k, *feats.shape[1:])

    def prepare(self, batch: Batch) -> Batch:
        """With the tower frozen, the batch with its images' tower features in place of its pixels:
        computed once here, then every forward (reference, epochs) reads them."""
        if "vision" in self.parts or batch.pixels is None or batch.image_features is not None:
            return batch
        validate_batch(batch)  # the rows that share a prompt share its pixels
        feats = self._features_jit(jax.lax.stop_gradient(self.base["vision"]), batch.pixels)
        return batch.replace(image_features=feats, pixels=None)

    def train_on_batch(
        self, state: TrainState, batch: Batch, on_update: Any = None, timings: dict[str, float] | None = None
    ) -> tuple[TrainState, list[dict[str, float]]]:
        return super().train_on_batch(state, self.prepare(batch), on_update=on_update, timings=timings)

    # --------------------------------------------------------------------------- the forward
    def _split(self, params: Params | None) -> Params | None:
        if not self._unroll or params is None:
            return params
        if "text" not in params:  # LoRA adapters (the language model's), or parts without it
            return split_params(params, self.text_cfg) if self.lora is not None and "layers" in params else params
        return {**params, "text": split_params(params["text"], self.text_cfg)}

    def _stack(self, grads: Params) -> Params:
        if not self._unroll:
            return grads
        if self.lora is not None:  # the adapters' gradient
            return join_params(grads, self.text_cfg)
        if "text" not in grads:
            return grads
        return {**grads, "text": join_params(grads["text"], self.text_cfg)}

    def _policy(self, params: Params, base: Params | None, key: jax.Array | None = None) -> Params:
        if base is None:
            return params
        if self.lora is not None:  # the adapters on the language model, the rest the base's
            return {**base, "text": attach(base["text"], params, self.cfg.lora, self.text_cfg, key)}
        return {**base, **params}

    def _text_params(self, params: Params) -> Params:
        return params["text"]

    def _input_embeds(self, params: Params, batch: Batch, dtype: Any) -> jax.Array:
        cfg = self.model_cfg
        m = vlm.module(cfg)
        x = embed_tokens(params["text"], self.text_cfg, batch.tokens, dtype)
        feats = batch.image_features
        if feats is None:
            if batch.pixels is None:
                return x
            b, k = batch.pixels.shape[:2]
            feats = m.tower_features(
                params["vision"], cfg, batch.pixels.reshape(b * k, *batch.pixels.shape[2:]), dtype
            )
            feats = feats.reshape(b, k, *feats.shape[1:])
        projected = m.project_features(params["projector"], cfg, feats, dtype)
        return vlm.merge_row_features(x, batch.tokens, projected, cfg.image_token_id, batch.completion_start)

    def _reach(self, batch: Batch) -> jax.Array | None:
        return vlm.image_reach(self.model_cfg, batch.tokens, batch.positions, batch.completion_start)


def check_image_tokens(records: Sequence[RolloutRecord], cfg: Any, *, source: str) -> None:
    """BadInputError unless each record's prompt holds as many image tokens as its images fill (on the
    host, before any work: the forward cannot raise on what the ids hold)."""
    for i, r in enumerate(records, start=1):
        n = len(r.images or ())
        got, want = r.prompt_ids.count(cfg.image_token_id), n * cfg.tokens_per_image
        if got != want:
            raise BadInputError(
                f"{source}:{i}: the prompt holds {got} image tokens (id {cfg.image_token_id}), but its "
                f"{n} image{'s' * (n != 1)} fill {want} ({cfg.tokens_per_image} each): the records were "
                "not sampled from this model"
            )


def record_pixels(
    records: Sequence[RolloutRecord], processor: Any, cfg: Any, *, source: str
) -> np.ndarray | None:
    """Each record's pixels [B, K, C, H, W] (K: the most images a record has; zeros pad), made by the
    checkpoint's processor from the record's prompt and image files as rollout made them; None when no
    record has images. BadInputError when a record's prompt holds another count of image tokens than
    its images fill (`check_image_tokens`), or its prompt_ids are not what the processor makes of its
    prompt and images."""
    from mllmjax import images as im

    check_image_tokens(records, cfg, source=source)
    counts = [len(r.images or ()) for r in records]
    if not any(counts):
        return None
    use_chat = bool(getattr(processor, "chat_template", None))  # as rollout builds its prompts
    made: dict[Any, np.ndarray] = {}
    rows: list[np.ndarray | None] = []
    for i, r in enumerate(records, start=1):
        if not r.images:
            rows.append(None)
            continue
        # A continuation's prompt is the processed prompt and a partial completion after it: the
        # pixels come from the prompt before it.
        prompt, continued = r.prompt, r.meta.get(CONTINUATION_KEY)
        if continued is not None and continued.get("prefix") and prompt.endswith(continued["prefix"]):
            prompt = prompt[: -len(continued["prefix"])]
        key = (prompt, tuple(x["path"] for x in r.images))
        if key not in made:
            where = f"{source}:{i}"
            pictures = [im.open_image(x["path"]) for x in r.images]
            ids, pixels = im.processor_inputs(processor, prompt, pictures, chat=use_chat, where=where)
            # (a continuation's prompt_ids are those of its prompt, then the partial completion's)
            if list(ids) != list(r.prompt_ids if continued is None else r.prompt_ids[: len(ids)]):
                raise BadInputError(
                    f"{where}: prompt_ids are not what the checkpoint's processor makes of the record's "
                    "prompt and images: the records come from a different processor"
                )
            made[key] = np.asarray(pixels, np.float32)
        rows.append(made[key])
    shape = next(x for x in rows if x is not None).shape[1:]
    out = np.zeros((len(records), max(counts), *shape), np.float32)
    for b, x in enumerate(rows):
        if x is not None:
            out[b, : len(x)] = x
    return out
