"""`mllmjax train`: PPO epochs of the GRPO loss on scored rollouts -> a new, resumable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mllmjax_cli.errors import err_console, handle_errors
from mllmjax_cli.options import DEFAULT_MESH, Force, Json, Mesh, Seed, Temperature
from mllmjax_cli.progress import stage_progress

HELP = """Run PPO epochs of the GRPO loss on scored rollout records and write a new checkpoint whose
`parent` is CKPT. The checkpoint holds the optimizer state too, so `--resume` continues bit for bit.
Per-update metrics (loss, KL, entropy, clip fractions, ratio range, grad norm, LR, tokens/s) are shown
and saved as OUT/train_metrics.jsonl.

The learning-rate schedule (linear warm-up, cosine to 0) spans --steps x --ppo-epochs x --minibatches
optimizer updates; a scripted loop that calls train once per step passes the loop's --steps and --resume.

Examples:

  mllmjax train ckpt/smollm2 s.jsonl -o ckpt/step1

  mllmjax train ckpt/step1 s2.jsonl -o ckpt/step2 --resume --steps 400 --temperature 1.0
"""


def register(app: typer.Typer) -> None:
    @app.command(
        name="train",
        help=HELP,
        short_help="PPO epochs of the GRPO loss on scored rollouts -> a new checkpoint.",
    )
    @handle_errors
    def train(
        ckpt: Annotated[Path, typer.Argument(help="Checkpoint to start from.")],
        scored: Annotated[
            str, typer.Argument(help='Scored rollout records (from `mllmjax score`; "-" = stdin).')
        ],
        out: Annotated[Path, typer.Option("-o", "--out", help="Checkpoint directory to write.")],
        ppo_epochs: Annotated[int, typer.Option("--ppo-epochs", help="Passes over the batch.")] = 2,
        minibatches: Annotated[int, typer.Option("--minibatches", help="Optimizer updates per epoch.")] = 1,
        micro_batch: Annotated[
            int | None,
            typer.Option("--micro-batch", help="Rows per forward/backward (gradients are summed)."),
        ] = None,
        lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 1e-6,
        optimizer: Annotated[str, typer.Option("--optimizer", help="lion or adamw.")] = "lion",
        weight_decay: Annotated[float, typer.Option("--weight-decay", help="Decoupled weight decay.")] = 1e-8,
        warmup: Annotated[float, typer.Option("--warmup", help="Warm-up fraction of all updates.")] = 0.05,
        steps: Annotated[int, typer.Option("--steps", help="GRPO steps the LR schedule spans.")] = 1,
        beta: Annotated[
            float, typer.Option("--beta", help="KL coefficient; 0 keeps no reference model.")
        ] = 0.04,
        kl: Annotated[str, typer.Option("--kl", help="KL estimator: k1, k2 or k3.")] = "k3",
        clip_low: Annotated[float, typer.Option("--clip-low", help="Ratio clip below: 1 - clip_low.")] = 0.2,
        clip_high: Annotated[
            float, typer.Option("--clip-high", help="Ratio clip above: 1 + clip_high.")
        ] = 0.3,
        loss_agg: Annotated[
            str, typer.Option("--loss-agg", help="token (global token mean), sequence, or dr_grpo.")
        ] = "token",
        temperature: Temperature = 1.0,
        tis_cap: Annotated[
            float | None,
            typer.Option("--tis-cap", help="Truncated importance sampling against the sampler's log-probs."),
        ] = None,
        remat: Annotated[
            str,
            typer.Option(
                "--remat", help="none, nothing_saveable, dots_saveable, dots_with_no_batch_dims_saveable."
            ),
        ] = "none",
        resume: Annotated[
            bool, typer.Option("--resume", help="Continue CKPT's optimizer state and step.")
        ] = False,
        seed: Seed = 0,
        mesh: Mesh = DEFAULT_MESH,
        force: Force = False,
        json_out: Json = False,
    ) -> None:
        from mllmjax.checkpoint import check_output
        from mllmjax.loss import LossConfig
        from mllmjax.optim import OptimConfig, total_updates
        from mllmjax.records import read_records
        from mllmjax.trainer import TrainConfig
        from mllmjax.training import train_checkpoint

        check_output(out, force)
        cfg = TrainConfig(
            loss=LossConfig(
                clip_low=clip_low, clip_high=clip_high, aggregation=loss_agg, beta=beta, kl_estimator=kl,
                tis_cap=tis_cap,
            ),
            optim=OptimConfig(
                name=optimizer, peak_lr=lr, warmup_frac=warmup, weight_decay=weight_decay,
                total_updates=total_updates(steps, ppo_epochs, minibatches),
            ),
            ppo_epochs=ppo_epochs,
            minibatches=minibatches,
            micro_batch=micro_batch,
            remat=remat,
            temperature=temperature,
        )  # fmt: skip
        records = read_records(scored)
        with stage_progress("train") as progress:
            task = progress.add_task("compiling", total=ppo_epochs * minibatches)

            def on_update(m: dict[str, float]) -> None:
                progress.update(
                    task,
                    advance=1,
                    description=f"loss {m['loss']:+.4f} kl {m['kl']:.4f} ent {m['entropy']:.3f} "
                    f"clip {m['clip_low'] + m['clip_high']:.3f} |g| {m['grad_norm']:.3f} lr {m['lr']:.2e} "
                    f"{m['tokens_per_s']:.0f} tok/s",
                )

            result = train_checkpoint(
                ckpt, records, out, cfg, source="<stdin>" if scored == "-" else scored, mesh=mesh,
                resume=resume, seed=seed, force=force, on_update=on_update,
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
