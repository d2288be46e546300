"""Paper memory of `mllmjax grpo` on Gemma 3 4B with vision (google/gemma-3-4b-it), which no machine
here can download: its config is written out below (the values its config.json sets, the rest
transformers' Gemma3 defaults), and the run's per-device estimate is what grpo's memory check would
print before starting (`grpo.context.run_estimates`, without the process's own runtime memory).

    python scripts/vlm_memory_plan.py                       # the README's command on one 80 GB GPU
    python scripts/vlm_memory_plan.py --prompt-len 400 --prompts-per-step 8 --group-size 8 --micro-batch 8
"""

from __future__ import annotations

import argparse
import dataclasses

# google/gemma-3-4b-it's config.json: what it sets; everything else is transformers' default.
GEMMA3_4B = dict(
    architectures=["Gemma3ForConditionalGeneration"],
    boi_token_index=255_999,
    eoi_token_index=256_000,
    image_token_index=262_144,
    mm_tokens_per_image=256,
    text_config=dict(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        rope_scaling={"factor": 8.0, "rope_type": "linear"},
        sliding_window=1024,
    ),
    vision_config=dict(
        hidden_size=1152,
        image_size=896,
        intermediate_size=4304,
        num_attention_heads=16,
        num_hidden_layers=27,
        patch_size=14,
        vision_use_head=False,
    ),
)
GB = 1e9


def gemma3_4b_config():
    import transformers

    from mllmjax.models.registry import model_config_from_hf

    hf = transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(**GEMMA3_4B["text_config"]),
        vision_config=transformers.SiglipVisionConfig(**GEMMA3_4B["vision_config"]),
        **{k: v for k, v in GEMMA3_4B.items() if k not in ("text_config", "vision_config")},
    ).to_dict()
    return model_config_from_hf(hf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=330,
                    help="the longest prompt: builtin:count's question and chat template (~70 tokens) "
                    "plus one image (256 image tokens and its 4 markers)")  # fmt: skip
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--optimizer", default="lion")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--dtype", default="bfloat16", help="parameter dtype (grpo's --dtype auto on a GPU)")
    ap.add_argument("--gpu-gb", type=float, default=80.0)
    args = ap.parse_args()

    from mllmjax.grpo.config import GRPOConfig
    from mllmjax.grpo.context import run_estimates

    model_cfg = gemma3_4b_config()
    cfg = GRPOConfig(
        prompts_per_step=args.prompts_per_step, group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, micro_batch=args.micro_batch, optimizer=args.optimizer,
        beta=args.beta, dtype=args.dtype,
    )  # fmt: skip
    text = sum(x.size for x in _leaves(model_cfg.text.param_specs()))
    tower = sum(x.size for x in _leaves(model_cfg.param_specs()["vision"]))
    print(f"gemma-3-4b-it: {text / 1e9:.2f} B language-model parameters, {tower / 1e9:.2f} B in the tower, "
          f"{model_cfg.tokens_per_image} tokens per image")  # fmt: skip
    estimates = run_estimates(cfg, model_cfg, cfg.train_config(), args.prompt_len, args.dtype, None, None, "gpu")
    for name, estimate in zip(("rollout", "update"), estimates, strict=True):
        print(dataclasses.replace(estimate, available=int(args.gpu_gb * GB)).describe(name))


def _leaves(specs):
    import math

    from mllmjax.models.params import map_specs

    out = []
    map_specs(lambda _, spec: out.append(type("S", (), {"size": math.prod(spec.shape)})()), specs)
    return out


if __name__ == "__main__":
    main()
