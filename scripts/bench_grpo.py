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

--vs-trl then runs TRL's GRPOTrainer (pip install -e '.[bench]') on the same work in a child process:
the same prompt text (our chat template, system prompt and worked examples, tokenized by the same
tokenizer), G completions forced to the same length (`min_new_tokens`), the same sampling (temperature
1, top-k 50), beta 0.04, 2 iterations (its generating step, then the step that reuses the generations),
gradient checkpointing on, its defaults otherwise (AdamW), on the CPU in float32 from the same GGUF.
It prints TRL's two steps against our step (generation + scoring + reference + the updates) and both
processes' peak resident memory. With --vs-trl our updates recompute each layer in the backward pass
(--remat nothing_saveable, as TRL's gradient checkpointing does) unless --remat says otherwise; our
checkpoint is converted in a child process, so neither peak counts a conversion.

    python scripts/bench_grpo.py                 # ~8 minutes on 2 cores
    python scripts/bench_grpo.py --reps 1 --new-tokens 64
    python scripts/bench_grpo.py --reps 1 --compare
    python scripts/bench_grpo.py --reps 1 --vs-trl   # ~10 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
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
    ap.add_argument("--remat", default=None, help="the updates' remat policy (default: none; with --vs-trl "
                    "nothing_saveable, as TRL's gradient checkpointing)")  # fmt: skip
    ap.add_argument("--vs-trl", action="store_true", help="also run TRL's GRPOTrainer on the same work")
    ap.add_argument("--trl-side", default=None, help=argparse.SUPPRESS)  # the child: a JSON file of the work
    args = ap.parse_args()
    if args.trl_side:
        trl_side(json.loads(Path(args.trl_side).read_text()))
        return
    remat = args.remat or ("nothing_saveable" if args.vs_trl else "none")

    from mllmjax.runtime import reexec_with_malloc_tuning, sync_dispatch_if_asked

    reexec_with_malloc_tuning([sys.executable, *sys.argv])  # the process settings the CLI runs with
    sync_dispatch_if_asked()
    import jax

    from mllmjax.checkpoint import load_checkpoint
    from mllmjax.data import Problem
    from mllmjax.grpo import GRPOConfig
    from mllmjax.rollout import encode_prompt, make_rollouts
    from mllmjax.scoring import score_records
    from mllmjax.sharding import make_mesh
    from mllmjax.trainer import Trainer
    from mllmjax.training import batch_from_records, place_batch

    tmp = tempfile.TemporaryDirectory()
    path = args.checkpoint
    if path is None:  # in a child process: the conversion's memory is not the step's
        path = Path(tmp.name) / "smollm2"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), str(ROOT)])}
        subprocess.run([sys.executable, "-m", "mllmjax_cli.main", "convert", "smollm2-135m", "-o", str(path)],
                       env=env, check=True, capture_output=True)  # fmt: skip
    cfg = GRPOConfig(
        model=str(path), data="gsm8k", group_size=args.group_size, max_new_tokens=args.new_tokens,
        ppo_epochs=args.ppo_epochs, steps=args.reps + 1, micro_batch=args.micro_batch,
        shared_prompt=args.shared_prompt and not args.compare, remat=remat,
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
    ours_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"\nSmolLM2-135M f32, 1 prompt x {args.group_size} x {args.new_tokens} new tokens, "
          f"{args.ppo_epochs} PPO epochs, remat {remat}, median of {len(rows)} warm steps on "
          f"{jax.devices()[0].platform}; peak RSS {ours_peak:.2f} GB")  # fmt: skip
    step = statistics.median(r["step"] for r in rows)
    print(f"{'phase':<16}{'seconds':>10}{'share':>8}")
    for key in rows[0]:
        value = statistics.median(r[key] for r in rows)
        share = "" if key in ("step", "rollout tok/s", *compared) else f"{value / step:7.0%}"
        print(f"{key:<16}{value:>10.2f}{share:>8}")
    if args.vs_trl:
        prompt, _ = encode_prompt(tokenizer, problem, cfg.rollout_config(seed=0))
        work = {"prompt": prompt, "answer": problem.answer, "group_size": args.group_size,
                "new_tokens": args.new_tokens, "iterations": args.ppo_epochs, "beta": cfg.beta,
                "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p}  # fmt: skip
        spec = Path(tmp.name) / "trl_work.json"
        spec.write_text(json.dumps(work))
        # TRL as its users run it: glibc's default malloc, not the heap tunables of our re-exec.
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MLLMJAX_SYNC_DISPATCH")}
        done = subprocess.run([sys.executable, __file__, "--trl-side", str(spec)], capture_output=True,
                              text=True, env=env)  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"TRL side failed:\n{done.stderr[-3000:]}")
        trl = json.loads(done.stdout.strip().splitlines()[-1])
        trl_step = sum(trl["steps"])
        print(f"\nTRL {trl['version']} GRPOTrainer, the same work (gradient checkpointing, AdamW, "
              f"{args.ppo_epochs} iterations):")  # fmt: skip
        print(f"{'':<28}{'mllmjax':>10}{'TRL':>10}{'ratio':>8}")
        print(f"{'step (s)':<28}{step:>10.2f}{trl_step:>10.2f}{step / trl_step:>8.2f}")
        print(f"{'  TRL generating step (s)':<28}{'':>10}{trl['steps'][0]:>10.2f}")
        print(f"{'  TRL reuse step (s)':<28}{'':>10}{sum(trl['steps'][1:]):>10.2f}")
        print(f"{'peak RSS (GB)':<28}{ours_peak:>10.2f}{trl['peak_rss_gb']:>10.2f}"
              f"{ours_peak / trl['peak_rss_gb']:>8.2f}")  # fmt: skip


def trl_side(work: dict) -> None:
    """TRL's GRPOTrainer on `work` (in a child process of its own); prints one JSON line: TRL's
    version, its steps' seconds (the generating step, then the reuse steps) and the peak RSS."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from mllmjax.weights.embedded import embedded_gguf_path

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model quantized, which the Trainer refuses to train, and TRL loads its
    # reference model from the policy's folder: the same weights, dequantized to float32 as we convert
    # them, saved as a plain HF folder that TRL loads as its users' models.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    folder = tempfile.TemporaryDirectory()
    model.save_pretrained(folder.name)
    tokenizer.save_pretrained(folder.name)
    del loaded, model
    steps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.t0)

    def correct(completions: list[str], **kwargs) -> list[float]:
        return [float(work["answer"] in c) for c in completions]

    with tempfile.TemporaryDirectory() as out:
        config = trl.GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
            per_device_train_batch_size=work["group_size"], num_generations=work["group_size"],
            max_completion_length=work["new_tokens"], generation_kwargs={"min_new_tokens": work["new_tokens"]},
            num_iterations=work["iterations"], max_steps=work["iterations"], beta=work["beta"],
            temperature=work["temperature"], top_k=work["top_k"], top_p=work["top_p"],
            gradient_checkpointing=True, seed=0,
        )  # fmt: skip
        trainer = trl.GRPOTrainer(
            model=folder.name, reward_funcs=correct, args=config, processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"prompt": work["prompt"]}] * 4), callbacks=[Clock()],
        )  # fmt: skip
        trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps({"version": trl.__version__, "steps": steps, "peak_rss_gb": peak}))


if __name__ == "__main__":
    main()
