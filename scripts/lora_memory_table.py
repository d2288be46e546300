"""The README's LoRA memory table: what one GRPO update of Qwen2.5-7B needs on one GPU, from the memory
estimator (`mllmjax.memory`, shapes only: nothing is allocated, no weights are read).

Every row: 16 rows x 1280 tokens (256 prompt + 1024 completion) per update, `--micro-batch 4`,
`--remat nothing_saveable`, bfloat16 compute, AdamW, `--beta 0.04`, one device.

    python scripts/lora_memory_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "lib"), str(ROOT)]

QWEN25_7B = {  # Qwen/Qwen2.5-7B-Instruct's config.json (the fields the estimate reads)
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "hidden_act": "silu",
}  # fmt: skip


def main() -> None:
    import dataclasses

    from mllmjax import lora, memory, models
    from mllmjax.loss import LossConfig
    from mllmjax.optim import OptimConfig
    from mllmjax.trainer import TrainConfig

    cfg = models.from_hf_config(QWEN25_7B)
    base = TrainConfig(
        loss=LossConfig(beta=0.04), optim=OptimConfig(name="adamw"), micro_batch=4, remat="nothing_saveable",
        compute_dtype="bfloat16",
    )  # fmt: skip
    rows = [("full fine-tuning, float32 master weights", base, "float32"),
            ("full fine-tuning, bfloat16 weights", base, "bfloat16"),
            ("LoRA rank 16, bfloat16 base", dataclasses.replace(base, lora=lora.LoraConfig(rank=16)), "bfloat16"),
            ("LoRA rank 64, bfloat16 base", dataclasses.replace(base, lora=lora.LoraConfig(rank=64)), "bfloat16")]  # fmt: skip
    print("| Setting | params | adapters | grads | optimizer | reference | activations + logits | total |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tcfg, dtype in rows:
        e = memory.for_train_config(cfg, tcfg, rows=16, seq_len=1280, completion_len=1024, param_dtype=dtype,
                                    mesh=None, donated=True)  # fmt: skip
        p = {k: v / 1e9 for k, v in e.parts.items()}
        act = p["activations"] + p["logits"] + p.get("experts", 0)
        print(f"| {name} | {p['params']:.1f} GB | {p.get('adapters', 0):.2f} GB | {p['grads']:.2f} GB | "
              f"{p['optimizer']:.2f} GB | {p['reference']:.1f} GB | {act:.1f} GB | {e.total / 1e9:.1f} GB |")  # fmt: skip


if __name__ == "__main__":
    main()
