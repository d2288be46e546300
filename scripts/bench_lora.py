"""LoRA against full fine-tuning, side by side: one update's memory and time, and decode speed with the
adapters merged into the sampler's copy or run as the low-rank path.

- update: SmolLM2-135M (the embedded checkpoint, float32), 8 rows x 256 tokens (64 prompt + 192
  completion), Lion, beta 0.04, the trainer's defaults otherwise; full fine-tuning vs --lora-rank 16
  (all 7 projections, alpha 32). Each mode runs in a child process of its own, which reports XLA's
  buffer assignment of the update program (arguments + temporaries + outputs not aliased onto donated
  arguments), the median seconds of --reps updates after a warm-up, and the process's peak RSS
  (ru_maxrss of the child).
- decode: greedy, --batch rows x --new-tokens, a rank-16 adapter with random b (so it matters), on
  SmolLM2-135M and a 1.2B Llama shape (random weights): the CPU decode loop merging the adapters into
  its output-major copy (`sampling.programs.MERGE_ADAPTERS`, the default) vs keeping the copy of the
  base weights plus the low-rank path. Each in a child process (the choice is read at trace time).

    python scripts/bench_lora.py                   # both parts
    python scripts/bench_lora.py --part update --reps 3
    python scripts/bench_lora.py --part update --remat nothing_saveable   # both modes rematerialised
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT)]

LLAMA_1B = {  # Llama-3.2-1B's shape
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu",
}  # fmt: skip


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["update", "decode", "both"], default="both")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--remat", default="none", help="the update's remat policy, in both modes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def _smollm2():
    from mllmjax.checkpoint import load_checkpoint
    from mllmjax.convert import resolve_model

    ckpt = load_checkpoint(resolve_model("smollm2-135m"))
    return ckpt.cfg, ckpt.params


def _update_child(mode: str, args: argparse.Namespace) -> dict:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mllmjax import lora
    from mllmjax.loss import LossConfig
    from mllmjax.trainer import Batch, TrainConfig, Trainer

    cfg, params = _smollm2()
    b, p, c = 8, 64, 192
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, p + c)), jnp.int32)
    batch = Batch(
        tokens=tokens, positions=jnp.broadcast_to(jnp.arange(p + c), (b, p + c)).astype(jnp.int32),
        valid=jnp.ones((b, p + c), bool), completion=jnp.zeros((b, p + c), bool).at[:, p:].set(True),
        advantages=jnp.asarray(rng.normal(size=b), jnp.float32), completion_start=p,
    )  # fmt: skip
    if mode == "full":
        tcfg = TrainConfig(loss=LossConfig(beta=0.04), remat=args.remat)
        trainer = Trainer(cfg, tcfg, ref_params=jax.tree.map(jnp.copy, params), donate=True)
        state = trainer.init_state(params, jax.random.key_data(jax.random.key(0)))
    else:
        lcfg = lora.LoraConfig(rank=args.rank)
        trainer = Trainer(
            cfg,
            TrainConfig(loss=LossConfig(beta=0.04), lora=lcfg, remat=args.remat),
            base=params,
            donate=True,
        )
        state = trainer.init_state(
            lora.init_adapters(cfg, lcfg, jax.random.key(1)), jax.random.key_data(jax.random.key(0))
        )
    batch = batch.replace(ref_logps=trainer.reference_logprobs(batch))
    compiled = jax.jit(trainer._update, donate_argnums=0).lower(state, batch, trainer.base).compile()
    mem = compiled.memory_analysis()
    xla = (
        mem.argument_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
    )
    times = []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        state, metrics, _ = trainer.update(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {"xla_bytes": int(xla), "seconds": sorted(times[1:])[len(times[1:]) // 2], "first_s": times[0]}


def _decode_child(spec: str, args: argparse.Namespace) -> dict:
    import time

    import jax
    import numpy as np

    from mllmjax import lora, models
    from mllmjax.models import transformer
    from mllmjax.sampling import Greedy, generate, programs

    shape, merge = spec.split(":")
    programs.MERGE_ADAPTERS = merge == "merge"
    if shape == "smollm2":
        cfg, params = _smollm2()
    else:
        cfg = models.from_hf_config(LLAMA_1B)
        params = transformer.init_params(cfg, jax.random.key(0))
    lcfg = lora.LoraConfig(rank=args.rank)
    adapters = lora.init_adapters(cfg, lcfg, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)
    policy = lora.attach(params, adapters, lcfg, cfg)
    prompts = [list(np.random.default_rng(i).integers(0, cfg.vocab_size, 24)) for i in range(args.batch)]
    kw = dict(max_new_tokens=args.new_tokens, max_batch=args.batch)
    generate(policy, cfg, prompts, Greedy(), **kw)  # compile
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        generate(policy, cfg, prompts, Greedy(), **kw)
        times.append(time.perf_counter() - t0)
    return {"tok_s": args.batch * args.new_tokens / min(times)}


def _run_child(kind: str, spec: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{kind}={spec}", "--reps", str(args.reps), "--rank",
           str(args.rank), "--remat", args.remat, "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]  # fmt: skip
    proc = subprocess.run(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    )
    if proc.returncode:
        raise SystemExit(f"child {kind}={spec} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = _args()
    if args.child:
        from mllmjax.runtime import reexec_with_malloc_tuning

        reexec_with_malloc_tuning([sys.executable, *sys.argv])  # the process settings the CLI runs with
        import resource

        kind, spec = args.child.split("=", 1)
        result = _update_child(spec, args) if kind == "update" else _decode_child(spec, args)
        result["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return
    gb = 1e9
    if args.part in ("update", "both"):
        rows = {mode: _run_child("update", mode, args) for mode in ("full", "lora")}
        full, low = rows["full"], rows["lora"]
        print(
            f"update, SmolLM2-135M float32, 8 x 256 tokens, Lion, beta 0.04, remat {args.remat} "
            f"(rank {args.rank} for LoRA):"
        )
        print(f"{'':8}{'XLA bytes':>12}{'peak RSS':>12}{'s/update':>10}{'first (compile)':>17}")
        for mode, r in rows.items():
            print(
                f"{mode:8}{r['xla_bytes'] / gb:10.2f}GB{r['rss_bytes'] / gb:10.2f}GB{r['seconds']:10.2f}{r['first_s']:15.1f}s"
            )
        print(f"lora / full: XLA {low['xla_bytes'] / full['xla_bytes']:.2f}, RSS {low['rss_bytes'] / full['rss_bytes']:.2f}, "
              f"time {low['seconds'] / full['seconds']:.2f}")  # fmt: skip
    if args.part in ("decode", "both"):
        print(
            f"decode, greedy, {args.batch} rows x {args.new_tokens} new tokens, rank-{args.rank} adapters (tok/s):"
        )
        for shape in ("smollm2", "llama-1b"):
            merged = _run_child("decode", f"{shape}:merge", args)
            low = _run_child("decode", f"{shape}:lowrank", args)
            print(f"  {shape:10} merged {merged['tok_s']:7.1f}  low-rank {low['tok_s']:7.1f}  "
                  f"ratio {merged['tok_s'] / low['tok_s']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
