"""Where the time of one GRPO step goes: rollout, scoring, reference log-probs, PPO updates.

One step as `mllmjax grpo` runs it (the same library calls: make_rollouts -> score_records ->
batch_from_records -> Trainer.train_on_batch), on SmolLM2-135M-Instruct (the embedded GGUF, float32),
1 GSM8K-style prompt x 16 completions x 128 new tokens (forced: no stop ids), 2 PPO epochs, KL on
(beta 0.04, so the reference log-probs are computed), micro-batches of 4 rows (gradients summed; the
whole batch in one pass needs ~24 GB here). Old log-probs cost nothing extra: epoch 0's
forward records them (ratio 1) for epoch 1. The step runs once to compile, then --reps times timed;
the table shows medians. Results and their history: docs/benchmarks.md.

The group's rows share their prompt, so the reference pass and the updates run it once per group (or
per micro-batch's part of one); --no-shared-prompt runs every row whole. --compare trains on each
step's batch both ways from the same state, the per-row path with --micro-batch and the shared one with
--shared-micro-batch (default: the whole group in one pass, which the shared prompt makes fit), and
prints the reference + update seconds of both.

    python scripts/bench_grpo.py                 # ~8 minutes on 2 cores
    python scripts/bench_grpo.py --reps 1 --new-tokens 64
    python scripts/bench_grpo.py --reps 1 --compare
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="timed steps after one compiling step")
    ap.add_argument(
        "--micro-batch", type=int, default=4,
        help="rows per forward/backward: 16 rows x ~480 tokens at once keep ~20 GB of attention activations",
    )  # fmt: skip
    ap.add_argument("--checkpoint", default=None, help="an existing checkpoint (default: convert the GGUF)")
    ap.add_argument("--shared-prompt", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compare", action="store_true", help="also train each batch with the other path")
    ap.add_argument("--shared-micro-batch", type=int, default=None, help="with --compare (default: -G)")
    args = ap.parse_args()

    from mllmjax.runtime import reexec_with_malloc_tuning, sync_dispatch_if_asked

    reexec_with_malloc_tuning([sys.executable, *sys.argv])  # the process settings the CLI runs with
    sync_dispatch_if_asked()
    import jax

    from mllmjax.checkpoint import load_checkpoint
    from mllmjax.convert import convert
    from mllmjax.data import Problem
    from mllmjax.grpo import GRPOConfig
    from mllmjax.rollout import make_rollouts
    from mllmjax.scoring import score_records
    from mllmjax.sharding import make_mesh
    from mllmjax.trainer import Trainer
    from mllmjax.training import batch_from_records, place_batch

    tmp = tempfile.TemporaryDirectory()
    path = args.checkpoint
    if path is None:
        path = Path(tmp.name) / "smollm2"
        convert("smollm2-135m", path)
    cfg = GRPOConfig(
        model=str(path), data="gsm8k", group_size=args.group_size, max_new_tokens=args.new_tokens,
        ppo_epochs=args.ppo_epochs, steps=args.reps + 1, micro_batch=args.micro_batch,
        shared_prompt=args.shared_prompt and not args.compare,
    )  # fmt: skip
    mesh = make_mesh(cfg.mesh)
    ckpt = load_checkpoint(path, mesh=mesh)
    tokenizer = ckpt.tokenizer()
    trainer = Trainer(ckpt.cfg, cfg.train_config(), ref_params=ckpt.params)
    state = trainer.init_state(ckpt.params, jax.random.key_data(jax.random.key(0)))
    shared = None
    if args.compare:  # the shared-prompt trainer beside the per-row one; its updates carry the state on
        shared_cfg = GRPOConfig(**{**cfg.to_dict(), "shared_prompt": True,
                                   "micro_batch": args.shared_micro_batch or args.group_size})  # fmt: skip
        shared = Trainer(ckpt.cfg, shared_cfg.train_config(), ref_params=ckpt.params)
    problem = Problem(id="bench:0", question=QUESTION, answer="72")
    rows: list[dict[str, float]] = []
    for rep in range(args.reps + 1):
        t0 = time.perf_counter()
        records = make_rollouts(
            state.params, ckpt.cfg, tokenizer, [problem], cfg.rollout_config(seed=rep),
            stop_ids=(), policy="bench", mesh=mesh,
        )  # fmt: skip
        t1 = time.perf_counter()
        scored, _ = score_records(records, cfg.score_config())
        t2 = time.perf_counter()
        batch = place_batch(batch_from_records(scored, pad_id=tokenizer.pad_token_id or 0), mesh)
        timings: dict[str, float] = {}
        compared, extra = {}, 0.0  # with --compare: the per-row training, left out of the step's time
        if shared is not None:
            per_row, history = trainer.train_on_batch(state, batch, timings=timings)
            compared["per-row ref"] = timings["ref_logps_s"]
            compared.update({f"per-row upd {i + 1}": h["seconds"] for i, h in enumerate(history)})
            compared["per-row ref+upd"] = timings["ref_logps_s"] + sum(h["seconds"] for h in history)
            extra = time.perf_counter() - t2
            state, history = shared.train_on_batch(state, batch, timings=timings)
            compared["shared ref+upd"] = timings["ref_logps_s"] + sum(h["seconds"] for h in history)
            compared["speed-up"] = compared["per-row ref+upd"] / compared["shared ref+upd"]
            gap = max(float(abs(a - b).max()) for a, b in zip(jax.tree.leaves(per_row.params),
                                                               jax.tree.leaves(state.params), strict=True))  # fmt: skip
            print(f"  params after the step, shared vs per-row: max |diff| {gap:.2e}", flush=True)
        else:
            state, history = trainer.train_on_batch(state, batch, timings=timings)
        t3 = time.perf_counter()
        tokens = sum(len(r.completion_ids) for r in records)
        row = {
            "rollout": t1 - t0,
            "scoring": t2 - t1,
            "ref log-probs": timings.get("ref_logps_s", 0.0),
            "old log-probs": 0.0,
            **{f"update {i + 1}": h["seconds"] for i, h in enumerate(history)},
            "step": t3 - t0 - extra,
            "rollout tok/s": tokens / (t1 - t0),
        }
        row["other"] = row["step"] - sum(v for k, v in row.items() if k not in ("step", "rollout tok/s"))
        row.update(compared)
        label = "compile + run" if rep == 0 else f"rep {rep}"
        print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        if rep:
            rows.append(row)
    print(f"\nSmolLM2-135M f32, 1 prompt x {args.group_size} x {args.new_tokens} new tokens, "
          f"{args.ppo_epochs} PPO epochs, median of {len(rows)} warm steps on {jax.devices()[0].platform}")  # fmt: skip
    step = statistics.median(r["step"] for r in rows)
    print(f"{'phase':<16}{'seconds':>10}{'share':>8}")
    for key in rows[0]:
        value = statistics.median(r[key] for r in rows)
        share = "" if key in ("step", "rollout tok/s", *compared) else f"{value / step:7.0%}"
        print(f"{key:<16}{value:>10.2f}{share:>8}")


if __name__ == "__main__":
    main()
