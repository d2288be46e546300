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
    assert np.abs(ours - ref).max() <= 1e-3
    assert ckpt.stop_ids == [2]  # <|im_end|> is SmolLM2's eos
    prompt = ckpt.tokenizer().apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
