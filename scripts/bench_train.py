"""One GRPO training update, JAX (mllmjax.trainer) against torch (HF LlamaForCausalLM), side by side.

Both sides: SmolLM2-135M's shape with random weights, float32, batch 8 x 256 tokens (64 prompt + 192
completion), per-token log-probs of the completion tokens from logits / temperature with a full-vocabulary
log-softmax, the clipped policy-gradient loss at ratio 1 (PPO epoch 0) with token-mean aggregation,
entropy of the completion tokens as a metric, KL off, backward, global-norm clipping and AdamW.
The torch side asks HF for logits only at the positions that predict completion tokens
(`logits_to_keep`), the same saving the JAX side makes, so the comparison is like for like.
The two run alternately in one process with the same thread count; seconds per update are medians,
with the process's CPU time beside them (steadier than wall time on a shared machine). Results and
their history: docs/benchmarks.md.

    python scripts/bench_train.py --threads 2 --reps 3
    python scripts/bench_train.py --remat nothing_saveable --chunk 512
    python scripts/bench_train.py --layer-loop scan
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="timed updates per side (after the warm-ups)")
    ap.add_argument(
        "--warmups", type=int, default=2,
        help="untimed rounds of both sides first (the first compiles; the kept heap settles after torch's "
        "allocations have passed through it)",
    )  # fmt: skip
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--completion", type=int, default=192)
    ap.add_argument("--remat", default="none", help="JAX remat policy (mllmjax.trainer.REMAT_POLICIES)")
    ap.add_argument(
        "--layer-loop", default="auto", choices=["auto", "scan", "unroll"],
        help="JAX decoder layers: scan or unroll (auto: unroll on a CPU without remat)",
    )  # fmt: skip
    ap.add_argument("--chunk", type=int, default=256, help="JAX tokens per chunk of LM-head logits")
    ap.add_argument(
        "--logit-recompute", choices=["auto", "yes", "no"], default="auto",
        help="JAX: recompute each chunk's logits in the backward (yes), keep the softmax (no), or the "
        "trainer's default (auto: keep up to 1 GiB)",
    )  # fmt: skip
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--torch-full-logits", action="store_true", help="torch: logits at every position")
    ap.add_argument("--only", choices=["jax", "torch"], default=None)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (exploration only)")
    return ap.parse_args()


def main() -> None:
    args = _parse()
    # torch's pool is set below; XLA's CPU pool takes every core, so run this on a machine (or under
    # `taskset`) with --threads cores for an equal split.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
    from mllmjax.runtime import reexec_with_malloc_tuning, sync_dispatch_if_asked

    reexec_with_malloc_tuning([sys.executable, *sys.argv])  # the process settings the CLI runs with
    sync_dispatch_if_asked()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mllmjax import models
    from mllmjax.loss import LossConfig
    from mllmjax.models import transformer
    from mllmjax.optim import OptimConfig
    from mllmjax.trainer import Batch, TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    cfg = models.smollm2_135m()
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    b, p, c = args.batch, args.prompt, args.completion
    t = p + c
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    adv = rng.normal(size=b).astype(np.float32)
    completion = np.zeros((b, t), bool)
    completion[:, p:] = True

    # ---------------------------------------------------------------- JAX
    tcfg = TrainConfig(
        loss=LossConfig(beta=0.0),
        optim=OptimConfig(name="adamw", peak_lr=1e-6, weight_decay=0.0, total_updates=1000),
        ppo_epochs=1,
        remat=args.remat,
        layer_loop=args.layer_loop,
        logit_chunk=args.chunk,
        logit_recompute={"auto": None, "yes": True, "no": False}[args.logit_recompute],
        micro_batch=args.micro_batch,
    )
    # Donating, as `mllmjax train` does: each update writes the new state into the old one's buffers
    # (torch's optimizer also updates in place).
    trainer = Trainer(cfg, tcfg, donate=True)
    state = trainer.init_state(transformer.init_params(cfg, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    batch = Batch(
        tokens=jnp.asarray(tokens),
        positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        valid=jnp.ones((b, t), bool),
        completion=jnp.asarray(completion),
        advantages=jnp.asarray(adv),
        completion_start=p,
    )

    def jax_step():
        nonlocal state
        state, metrics, _ = trainer.update(state, batch)
        jax.block_until_ready((state, metrics))
        return float(metrics["loss"]), float(metrics["entropy"])

    # ---------------------------------------------------------------- torch
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    t_tokens = torch.from_numpy(tokens.astype(np.int64))
    t_adv = torch.from_numpy(adv)[:, None]
    targets = t_tokens[:, p:]  # [B, C]

    def torch_step():
        opt.zero_grad(set_to_none=True)
        keep = 0 if args.torch_full_logits else c + 1
        logits = model(input_ids=t_tokens, logits_to_keep=keep).logits  # [B, c+1 or T, V]
        logits = logits[:, -(c + 1) : -1].float() / 1.0  # positions that predict completion tokens
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, targets[..., None])[..., 0]  # [B, C]
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        ratio = torch.exp(logp - logp.detach())
        pg = -torch.minimum(ratio * t_adv, torch.clamp(ratio, 0.8, 1.3) * t_adv)
        loss = pg.mean()  # every completion slot is a token here: token mean
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss), float(entropy)

    sides = {"jax": jax_step, "torch": torch_step}
    if args.only:
        sides = {args.only: sides[args.only]}
    times: dict[str, list[float]] = {k: [] for k in sides}
    # CPU seconds of the whole process: steadier than wall time when other jobs share the cores.
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    # Warm-up rounds, alternating like the timed ones: the first compiles. torch allocates through the
    # same malloc heap (kept, see mllmjax.runtime), and the first JAX update after torch's first ones
    # grew it (15-16 s, 10 s of it in the kernel); `mllmjax train` has no torch beside it.
    for warm in range(max(1, args.warmups)):
        for name, fn in sides.items():
            start = time.perf_counter()
            loss, ent = fn()
            print(
                f"{name} warm-up {warm} {time.perf_counter() - start:.1f} s  loss {loss:.5f}  entropy {ent:.4f}",
                flush=True,
            )
    for rep in range(args.reps):
        for name, fn in sides.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(f"rep {rep} {name}: {times[name][-1]:.2f} s wall, {cpu[name][-1]:.2f} s cpu", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    for k, v in med.items():
        print(
            f"{k}: {v:.2f} s/update wall, {med_cpu[k]:.2f} s cpu (median of {len(times[k])}; "
            f"{b * c / v:.0f} completion tokens/s)"
        )
    if len(med) == 2:
        print(f"speed ratio JAX/torch = {med['torch'] / med['jax']:.2f}x wall (>1 means JAX is faster)")
        print(f"speed ratio JAX/torch = {med_cpu['torch'] / med_cpu['jax']:.2f}x cpu time")
    print(
        f"settings: threads={args.threads} remat={args.remat} layer_loop={args.layer_loop} chunk={args.chunk} "
        f"logit_recompute={args.logit_recompute} micro_batch={args.micro_batch} "
        f"torch_full_logits={args.torch_full_logits} jax={jax.__version__} torch={torch.__version__}"
    )


if __name__ == "__main__":
    main()
