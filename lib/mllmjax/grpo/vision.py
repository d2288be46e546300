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
- Several processes: refused (`check_vision_run`). The pieces are in place (each process samples its
  share through `rollout.host_vision_rollouts`, process 0 draws the pictures before any host reads
  them, every process makes the whole batch's pixels from the gathered records), but two-process test
  runs hung now and then in step 2's copy of the model onto each host's devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mllmjax.grpo.context import RunContext


def check_vision_run(tcfg: Any, start_checkpoint: Path) -> None:
    """BadInputError, before anything is loaded or written, for what a vision-language run does not
    support: LoRA with --train-vision (`vision_training.check_lora`), and several processes."""
    import jax

    from mllmjax.errors import BadInputError
    from mllmjax.vision_training import check_lora

    check_lora(tcfg, start_checkpoint)
    if jax.process_count() > 1:
        # 2 of ~16 two-process test runs hung in step 2's copy of the model onto each host's devices
        # (both processes waiting in the reshard's Execute); until that is understood, refused.
        raise BadInputError(
            f"{start_checkpoint} is a vision-language checkpoint: grpo on one does not support several "
            "processes yet; run it without (rollout and eval do run on several)"
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
    """This process's share of the rollouts of `problems` (`rollout.host_vision_rollouts`) under the
    whole model's params, copied onto the decode mesh where it is another (--sample-mesh, several
    processes), in the run's compute dtype. The visual task pictures of all of `problems` are drawn
    first by the process that writes the run directory (`data.visual.draw_missing`): every process
    reads them, its share's now and all of them for the step's update."""
    from mllmjax.data.visual import draw_missing
    from mllmjax.distributed import barrier
    from mllmjax.rollout import host_vision_rollouts

    if ctx.primary:
        draw_missing(problems)
    barrier("grpo:pictures")
    return host_vision_rollouts(
        params, ctx.model_cfg, ctx.processor, problems, rcfg, stop_ids=ctx.stop_ids, policy=policy,
        mesh=ctx.sample_mesh, first_group=first_group, meta=meta, on_batch=on_batch,
        compute_dtype=ctx.cfg.compute_dtype,
    )  # fmt: skip


def batch_pixels(ctx: RunContext, records: Sequence[Any], step: int) -> Any:
    """The step's records' pixels [B, K, C, H, W] (`vision_training.record_pixels`), or None on a text
    run or when no record has images."""
    if not ctx.vision:
        return None
    from mllmjax.vision_training import record_pixels

    return record_pixels(records, ctx.processor, ctx.model_cfg, source=f"step {step}'s rollouts")
