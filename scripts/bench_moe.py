"""Mixture-of-experts decode speed: the routed experts (`blocks.moe`, "auto": its loop over the blocks
that hold pairs on CPU) against the same model with every expert computed densely and weighted
(`moe_impl="dense"`: no dispatch, one wide weight-first product per projection), through the real
sampler (`sampling.generate`, greedy, exactly --new-tokens tokens, stop tokens ignored).

The model is a Qwen3-MoE config with random float32 weights: by default 6 layers, hidden 512, 128
experts 192 wide (Qwen3-30B-A3B's ratio of expert width to hidden size, 0.375), top-2, a 90,112-token
vocabulary with untied embeddings (as Qwen3-MoE's): 323M parameters, of which 100M are active per
token (the input embedding, 46M, costs no FLOPs). Runs alternate routed / dense per repeat, so
machine noise hits both alike; the median decode tok/s of the repeats is reported (compilation
excluded: each shape is run once first; prefill excluded: each repeat also times prefill + 1 token).

    python scripts/bench_moe.py                          # batch 16, 64 new tokens, 3 repeats
    python scripts/bench_moe.py --experts 128 --top-k 8  # Qwen3's routing, same size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT)]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--moe-intermediate", type=int, default=192)
    ap.add_argument("--vocab", type=int, default=90112)
    ap.add_argument("--tied", action="store_true", help="tie the LM head to the embedding")
    return ap.parse_args()


def main() -> None:
    args = _args()
    from mllmjax.runtime import reexec_with_malloc_tuning, sync_dispatch_if_asked

    reexec_with_malloc_tuning([sys.executable, *sys.argv])  # the process settings the CLI runs with
    sync_dispatch_if_asked()
    import dataclasses

    import jax
    import numpy as np

    from mllmjax.models import qwen3_moe, transformer
    from mllmjax.sampling import Greedy, generate

    cfg = qwen3_moe.Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_layers=args.layers,
        num_heads=8,
        num_kv_heads=2,
        head_dim=args.hidden // 8,
        tie_word_embeddings=args.tied,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate,
        norm_topk_prob=True,
        max_position_embeddings=4096,
    )
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.num_layers
    total = cfg.num_params()
    active = total - (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    print(
        f"model: Qwen3-MoE, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts "
        f"x {cfg.moe_intermediate_size} wide, top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size} "
        f"({'tied' if cfg.tie_word_embeddings else 'untied'}): "
        f"{total / 1e6:.0f}M parameters, {active / 1e6:.0f}M active per token; float32, "
        f"{jax.default_backend()}, {jax.device_count()} device(s)"
    )
    params = transformer.init_params(cfg, jax.random.key(0))
    dense_cfg = dataclasses.replace(cfg, moe_impl="dense")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt_tokens).tolist() for _ in range(args.batch)]
    runs = {"routed": cfg, "dense": dense_cfg}

    def decode(c: qwen3_moe.Qwen3MoeConfig, new: int) -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        out = generate(params, c, prompts, Greedy(), max_new_tokens=new)
        return time.perf_counter() - start, [o.ids for o in out]

    for c in runs.values():  # compile both lengths
        decode(c, 1)
        decode(c, args.new_tokens)
    # Each repeat times prefill + 1 token and prefill + new tokens back to back, for each model in
    # turn: their difference is the decode of new - 1 tokens.
    steps: dict[str, list[float]] = {name: [] for name in runs}
    ids: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, c in runs.items():
            first, _ = decode(c, 1)
            seconds, ids[name] = decode(c, args.new_tokens)
            steps[name].append((seconds - first) / (args.new_tokens - 1))
    tok_s = {}
    for name in runs:
        step = statistics.median(steps[name])
        tok_s[name] = args.batch / step
        print(
            f"{name:>6}: batch {args.batch}, {args.new_tokens} new tokens: {tok_s[name]:7.1f} tok/s "
            f"({1e3 * step:.1f} ms/step; repeats {', '.join(f'{1e3 * t:.1f}' for t in steps[name])} ms)"
        )
    print(
        f"routed / dense: {tok_s['routed'] / tok_s['dense']:.2f}x; same tokens: {ids['routed'] == ids['dense']}"
    )


if __name__ == "__main__":
    main()
