"""Speed on an accelerator: decode tok/s (and its fraction of the HBM roofline) at batch 1/16/64 and one
training update's tokens/s and MFU, for SmolLM2-135M's shape and a Qwen2.5-1.5B shape with random
bfloat16 weights built here (nothing to download). Run by scripts/gpu_check.sh on a lent GPU;
`--small` runs a tiny shape on any backend to check the script itself.

Roofline of a decode step: every parameter byte once plus the filled KV cache, over the HBM bandwidth
(--hbm-tbps, H200: 4.8 TB/s). MFU: 6 x parameters x tokens (plus attention: 12 x layers x heads x
head_dim x T^2 / 2 per sequence, causal) per second over the dense bfloat16 peak (--peak-tflops; the
default is a stated H200 figure, see docs/benchmarks.md).

    python scripts/gpu_bench.py
    python scripts/gpu_bench.py --small          # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT)]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "qwen2.5-1.5b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--small", action="store_true", help="a tiny shape and sizes: checks the script on CPU")
    return ap.parse_args()


def _config(name: str):
    from mllmjax import models
    from mllmjax.models.qwen2 import Qwen2Config

    if name == "smollm2-135m":
        return models.smollm2_135m()
    if name == "qwen2.5-1.5b":
        return Qwen2Config(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
            num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
            max_position_embeddings=32768, tie_word_embeddings=True,
        )  # fmt: skip
    if name == "tiny":
        return models.tiny()
    raise SystemExit(f"unknown shape {name!r}")


def _decode(cfg, params, batch: int, args) -> tuple[float, float]:
    """(tokens/s, fraction of the HBM roofline) of greedy decoding, new tokens forced."""
    import numpy as np

    from mllmjax.models.transformer import param_bytes
    from mllmjax.sampling import Greedy, generate

    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_tokens)).tolist()
    run = lambda: generate(params, cfg, prompts, Greedy(), max_new_tokens=args.new_tokens, max_batch=batch)  # noqa: E731
    run()
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
        assert all(len(c.ids) == args.new_tokens for c in out)
    step = statistics.median(times) / args.new_tokens
    context = args.prompt_tokens + args.new_tokens / 2
    kv = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim * 2  # bfloat16 cache
    roofline = (param_bytes(params) + kv) / (args.hbm_tbps * 1e12)
    return batch / step, roofline / step


def _train(cfg, params, args, attention: str) -> tuple[float, float]:
    """(tokens/s, MFU) of one GRPO update (AdamW, no KL) on train-batch x train-seq tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mllmjax.loss import LossConfig
    from mllmjax.optim import OptimConfig
    from mllmjax.trainer import Batch, TrainConfig, Trainer

    b, t = args.train_batch, args.train_seq
    p = t // 4
    tcfg = TrainConfig(loss=LossConfig(beta=0.0), optim=OptimConfig(name="adamw", total_updates=100),
                       ppo_epochs=1, attention=attention)  # fmt: skip
    trainer = Trainer(cfg, tcfg)
    state = trainer.init_state(params, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    completion = np.zeros((b, t), bool)
    completion[:, p:] = True
    batch = Batch(
        tokens=jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        valid=jnp.ones((b, t), bool), completion=jnp.asarray(completion),
        advantages=jnp.asarray(rng.normal(size=b), jnp.float32), completion_start=p,
    )  # fmt: skip
    state, m, _ = trainer.update(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        state, m, _ = trainer.update(state, batch)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    flops = 6 * cfg.num_params() * b * t + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * b * t * t / 2
    return b * t / sec, flops / sec / (args.peak_tflops * 1e12)


def main() -> None:
    args = _args()
    if args.small:
        args.shapes, args.batch, args.new_tokens, args.prompt_tokens = ["tiny"], [1, 4], 8, 8
        args.train_batch, args.train_seq, args.reps = 2, 32, 1
    import jax
    import jax.numpy as jnp

    from mllmjax.models import transformer

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})", flush=True)
    rows = []
    for name in args.shapes:
        cfg = _config(name)
        params = transformer.init_params(cfg, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
        for batch in args.batch:
            try:
                tps, frac = _decode(cfg, params, batch, args)
                rows.append((name, f"decode b={batch}", f"{tps:,.0f} tok/s", f"{frac:.0%} of HBM roofline"))
            except Exception as e:  # one failure must not hide the rest of the table
                traceback.print_exc()
                rows.append((name, f"decode b={batch}", "FAILED", type(e).__name__))
            print(*rows[-1], sep="  |  ", flush=True)
        attentions = ["xla", "cudnn"] if jax.default_backend() == "gpu" else ["xla"]
        for attention in attentions:
            label = f"train {args.train_batch}x{args.train_seq} ({attention})"
            try:
                tps, mfu = _train(cfg, params, args, attention)
                rows.append((name, label, f"{tps:,.0f} tok/s", f"MFU {mfu:.1%}"))
            except Exception as e:
                traceback.print_exc()
                rows.append((name, label, "FAILED", type(e).__name__))
            print(*rows[-1], sep="  |  ", flush=True)
    print("\n| shape | what | speed | efficiency |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
