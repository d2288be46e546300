"""The embedded default model end to end: `mllmjax convert smollm2-135m` vs HF transformers loading the
same GGUF (slow: real 135M-parameter checkpoint; CI runs it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mllmjax.checkpoint import load_checkpoint
from mllmjax.models import transformer

pytestmark = pytest.mark.slow


def test_converted_logits_match_hf_on_a_64_token_prompt(smollm2_ckpt, smollm2_hf):
    model, tokenizer = smollm2_hf
    text = (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? Let us think step by step about it: "
        "in April she sold 48 clips, and in May she sold half of that, which is 24 clips, so in total 72."
    )
    ids = tokenizer(text)["input_ids"]
    assert len(ids) >= 64
    ids = np.asarray([ids[:64]])
    ckpt = load_checkpoint(smollm2_ckpt)
    assert ckpt.cfg.tie_word_embeddings and "lm_head" not in ckpt.params
    ours = np.asarray(transformer.logits(ckpt.params, ckpt.cfg, ids))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    # Both sides are float32 through 30 layers; the bounds are the sum of each side's measured error
    # against a float64 evaluation of the same GGUF weights (ours in x64; it matches HF in float64,
    # RoPE and RMSNorm included, to 6e-10): ours 5.2e-4 max / 3.6e-5 rms, HF's 1.5e-4 / 1.5e-5.
    # Ours is larger: XLA:CPU's float32 matmuls round ~2.5x more than torch's (one [64, 1536] x
    # [1536, 576] product: rms error 1.6e-7 vs 5.8e-8 of the output's scale). Measured here: 4.1e-4
    # max (at token 6; the GGUF test's shorter chat prompt gives 1.2e-4), 2.9e-5 rms. The rms bound
    # is the sensitive one: RMSNorm's eps off by 2% (1.02e-5) gives 5.4e-4 max but 6.5e-5 rms.
    diff = ours - ref
    assert np.abs(diff).max() <= 2e-5 * np.abs(ref).max(), np.abs(diff).max()  # 7.0e-4
    assert np.sqrt(np.mean(diff**2)) <= 5e-5, np.sqrt(np.mean(diff**2))
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert ckpt.stop_ids == [2]  # <|im_end|> is SmolLM2's eos
    prompt = ckpt.tokenizer().apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
