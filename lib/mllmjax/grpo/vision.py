"""A GRPO run on a vision-language checkpoint (LLaVA, Gemma 3): what differs from a text run.

- Prompts are built by the checkpoint's own HF processor with their images and sampled by
  `rollout.make_vision_rollouts` (the tower runs once per prompt, its G samples share the prefill),
  for the steps, the probe and the held-out evaluation alike (`rollouts`).
- A visual built-in task (builtin:count, builtin:read) names its pictures in RUN/images/ when the data
  is loaded and draws each when a step (or the evaluation) first uses it: a run reads a few of a
  split's 20,000. A picture is a pure function of its scene, so a resumed run draws the same file.
- The train state holds the trained parts (the language model, the projector unless
  --no-train-projector, the tower only with --train-vision: `vision_training.VisionTrainer`); rollouts
  and checkpoints use the whole model (`RunContext.policy`). Each step's batch carries its records'
  pixels, made by the processor from the records' prompts and pictures (`vision_training.record_pixels`).
- --compute-dtype runs the tower, projector and decoder of the rollouts in it (training's forward
  already does); --sample-mesh decodes on a copy of the whole model resharded onto that mesh, as a
  text run's rollouts do.
- With --lora-rank the adapters train on the language model, the tower and projector frozen with the
  base (`vision_training`); rollouts run the adapters attached to it, checkpoints hold the adapters.
- The replay buffer (--replay-prob) continues a completion after its prompt with the prompt's images
  (`rollout.make_vision_rollouts`); a completion that holds an image token is not stored
  (`RunContext.image_token_ids`).
- Not yet: several processes, refused before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllmjax.errors import BadInputError

if TYPE_CHECKING:
    from mllmjax.grpo.context import RunContext


def check_vision_run(tcfg: Any, start_checkpoint: Path) -> None:
    """BadInputError, before anything is loaded or written, for what a vision-language run does not
    support yet."""
    import jax

    from mllmjax.vision_training import check_lora

    check_lora(tcfg, start_checkpoint)
    if jax.process_count() > 1:
        raise BadInputError(
            f"{start_checkpoint} is a vision-language checkpoint: grpo on one does not support several "
            "processes yet; run it without"
        )


def rollouts(
    ctx: RunContext,
    params: Any,
    problems: Sequence[Any],
    rcfg: Any,
    *,
    policy: str,
    first_group: int = 0,
    meta: dict[str, Any] | None = None,
    on_batch: Any = None,
) -> list[Any]:
    """`rollout.make_vision_rollouts` of `problems` under the whole model's params (resharded onto the
    decode mesh, where --sample-mesh makes it another), their visual task pictures drawn first
    (`data.visual.draw_missing`), in the run's compute dtype."""
    from mllmjax.data.visual import draw_missing
    from mllmjax.rollout import make_vision_rollouts
    from mllmjax.sharding import shard_params

    draw_missing(problems)
    if ctx.sample_mesh is not ctx.mesh:  # a copy on the decode mesh, alive while this call runs
        params = shard_params(params, ctx.model_cfg, ctx.sample_mesh)
    mesh = ctx.sample_mesh if ctx.sample_mesh.devices.size > 1 else None
    return make_vision_rollouts(
        params, ctx.model_cfg, ctx.processor, problems, rcfg, stop_ids=ctx.stop_ids, policy=policy,
        first_group=first_group, mesh=mesh, meta=meta, on_batch=on_batch, compute_dtype=ctx.cfg.compute_dtype,
    )  # fmt: skip


def batch_pixels(ctx: RunContext, records: Sequence[Any], step: int) -> Any:
    """The step's records' pixels [B, K, C, H, W] (`vision_training.record_pixels`), or None on a text
    run or when no record has images."""
    if not ctx.vision:
        return None
    from mllmjax.vision_training import record_pixels

    return record_pixels(records, ctx.processor, ctx.model_cfg, source=f"step {step}'s rollouts")
