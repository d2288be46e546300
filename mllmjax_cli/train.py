"""`mllmjax train`: PPO epochs of the GRPO loss on scored rollouts -> a new, resumable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mllmjax.settings import TRAIN_SETTINGS, Settings
from mllmjax_cli.errors import err_console, handle_errors
from mllmjax_cli.flags import Override, with_settings
from mllmjax_cli.options import Force, Json
from mllmjax_cli.progress import stage_progress

HELP = """Run PPO epochs of the GRPO loss on scored rollout records and write a new checkpoint whose
`parent` is CKPT. The checkpoint holds the optimizer state too, so `--resume` continues bit for bit.
Per-update metrics (loss, KL, entropy, clip fractions, ratio range, grad norm, LR, tokens/s, the
sampler/trainer log-prob gap logp_mismatch_mean/_max, and a mixture of experts' router load-balancing
loss router_aux) are shown and saved as OUT/train_metrics.jsonl.

With --lora-rank R only rank-R adapters are trained, on the frozen base (also the KL reference), and OUT
holds just the adapters; train a LoRA checkpoint on with the same --lora-* flags (README: LoRA).

A vision-language checkpoint (LLaVA, Gemma 3) trains on rollouts with images (schema mllmjax.rollout/2, from
`mllmjax rollout` on it) and on text rollouts: each record's images are checked against their SHA-256
and prepared by the checkpoint's own processor. The language model and the projector train, the vision
tower stays frozen (--train-vision trains it, --no-train-projector freezes the projector), and OUT is a
whole vision-language checkpoint (with the processor's files) that sample, rollout and export read. With
--lora-rank the adapters train on its language model alone (tower and projector frozen) and OUT holds
them. Records with images on a text checkpoint are an error.

The learning-rate schedule (linear warm-up, cosine to 0) spans --steps x --ppo-epochs x --minibatches
optimizer updates; a scripted loop that calls train once per step passes the loop's --steps and --resume.

Examples:

  mllmjax train ckpt/smollm2 s.jsonl -o ckpt/step1

  mllmjax train ckpt/step1 s2.jsonl -o ckpt/step2 --resume --steps 400 --temperature 1.0

  mllmjax train ckpt/llava scored-images.jsonl -o ckpt/llava-step1
"""


def register(app: typer.Typer) -> None:
    @app.command(
        name="train",
        help=HELP,
        short_help="PPO epochs of the GRPO loss on scored rollouts -> a new checkpoint.",
    )
    @handle_errors
    # One call is one step of a scripted loop: by default the schedule spans this one step.
    @with_settings(*TRAIN_SETTINGS, "seed", "mesh", steps=Override(1, "GRPO steps the LR schedule spans."))
    def train(
        ckpt: Annotated[Path, typer.Argument(help="Checkpoint to start from.")],
        scored: Annotated[
            str, typer.Argument(help='Scored rollout records (from `mllmjax score`; "-" = stdin).')
        ],
        out: Annotated[Path, typer.Option("-o", "--out", help="Checkpoint directory to write.")],
        resume: Annotated[
            bool, typer.Option("--resume", help="Continue CKPT's optimizer state and step.")
        ] = False,
        force: Force = False,
        json_out: Json = False,
        **settings: Any,
    ) -> None:
        from mllmjax.checkpoint import check_output, read_meta
        from mllmjax.models.registry import is_vision_language
        from mllmjax.records import read_records, refuse_images
        from mllmjax.sharding import make_mesh
        from mllmjax.training import make_train_config, train_checkpoint

        check_output(out, force)
        mesh = make_mesh(settings.pop("mesh"))
        s = Settings(**settings)
        cfg = make_train_config(s)
        meta = read_meta(ckpt, vision_language=True)  # a clear error before the records are read
        records = read_records(scored)
        if not is_vision_language(str(meta.get("family", ""))):
            refuse_images(records, source="<stdin>" if scored == "-" else str(scored), model=ckpt)
        with stage_progress("train") as progress:
            task = progress.add_task("compiling", total=s.ppo_epochs * s.minibatches)

            def on_update(m: dict[str, float]) -> None:
                progress.update(
                    task,
                    advance=1,
                    description=f"loss {m['loss']:+.4f} kl {m['kl']:.4f} ent {m['entropy']:.3f} "
                    f"clip {m['clip_low'] + m['clip_high']:.3f} |g| {m['grad_norm']:.3f} lr {m['lr']:.2e} "
                    f"{m['tokens_per_s']:.0f} tok/s"
                    + (f" logp gap {m['logp_mismatch_max']:.1e}" if "logp_mismatch_max" in m else "")
                    + (f" router aux {m['router_aux']:.4f}" if "router_aux" in m else ""),
                )

            result = train_checkpoint(
                ckpt, records, out, cfg, source="<stdin>" if scored == "-" else scored, mesh=mesh,
                resume=resume, seed=s.seed, force=force, on_update=on_update,
                on_memory=lambda est: progress.console.print(est.describe()),
            )  # fmt: skip
        if json_out:
            typer.echo(json.dumps({"out": str(result.out), "step": result.step, "updates": result.history}))
            return
        last = result.history[-1]
        err_console.print(
            f"wrote {result.out} (step {result.step}, {result.updates} updates): loss {last['loss']:+.4f}, "
            f"kl {last['kl']:.4f}, entropy {last['entropy']:.3f}, grad norm {last['grad_norm']:.3f}, "
            f"lr {last['lr']:.2e}"
        )
