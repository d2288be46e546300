"""Hostile input across the commands: each case must exit with its documented code and one `error:` line
(no traceback), and leave no output or temporary file behind.

A table of cases, each run as a user would (the console script in a subprocess, stdin and files as given).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import save_hf_model

from mllmjax.convert import convert

ROOT = Path(__file__).resolve().parents[1]
NOT_UTF8 = b'{"question": "1+1?", "answer": "2"}\n\xff\xfe binary \x00\n'


def _record(group: int, sample: int, logprob: str = "-0.5") -> bytes:
    """One rollout record line (JSON text as a writer other than ours might produce it)."""
    return (
        f'{{"schema": "mllmjax.rollout/1", "prompt_id": "p{group}", "group": {group}, "sample": {sample}, '
        f'"prompt": "q", "prompt_ids": [1], "completion": "<answer>4</answer>", "completion_ids": [5, 6], '
        f'"logprobs": [-0.1, {logprob}], "finish_reason": "stop", "answer": "4", "meta": {{}}, "policy": "p"}}\n'
    ).encode()


GROUP = _record(0, 0) + _record(0, 1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile")
    save_hf_model("llama-tied", folder / "hf", seed=1)
    convert(str(folder / "hf"), folder / "ck")
    return folder / "ck"


def run(args: list[str], cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), str(ROOT)]), "XLA_FLAGS": "",
           "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "mllmjax_cli.main", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, input=stdin, capture_output=True, timeout=300)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


# (name, files to write {name: bytes}, args (CK = the checkpoint), stdin, exit code, text the error names)
CASES = [
    ("sample: prompts file not UTF-8", {"p.txt": b"hello\n\xff\xfe\n"},
     ["sample", "CK", "--prompts", "p.txt", "--json", "-o", "out.jsonl"], b"", 2, "p.txt:2: not UTF-8"),
    ("sample: JSON prompts not UTF-8", {"p.jsonl": b'{"prompt": "a"}\n{"prompt": "\xc3("}\n'},
     ["sample", "CK", "--prompts", "p.jsonl", "--json", "-o", "out.jsonl"], b"", 2, "p.jsonl:2: not UTF-8"),
    ("sample: prompts on stdin not UTF-8", {}, ["sample", "CK", "--prompts", "-", "--json", "-o", "out.jsonl"],
     b"a\nb\n\x80\n", 2, "<stdin>:3: not UTF-8"),
    ("rollout: data file not UTF-8", {"d.jsonl": NOT_UTF8},
     ["rollout", "CK", "--data", "d.jsonl", "-G", "2", "-o", "out.jsonl"], b"", 2, "d.jsonl:2: not UTF-8"),
    ("eval: data file not UTF-8", {"d.jsonl": NOT_UTF8},
     ["eval", "CK", "--data", "d.jsonl", "-o", "out.jsonl"], b"", 2, "d.jsonl:2: not UTF-8"),
    ("score: records not UTF-8", {"r.jsonl": b"\n\n\xff\n"}, ["score", "r.jsonl", "-o", "out.jsonl"], b"", 2,
     "r.jsonl:3: not UTF-8"),
    ("score: records on stdin not UTF-8", {}, ["score", "-", "-o", "out.jsonl"], b"\n\xfe\n", 2,
     "<stdin>:2: not UTF-8"),
    ("train: records not UTF-8", {"r.jsonl": b"\xff"}, ["train", "CK", "r.jsonl", "-o", "out"], b"", 2,
     "r.jsonl:1: not UTF-8"),
    ("sample: greedy with --top-p 1.5", {}, ["sample", "CK", "hi", "--greedy", "--top-p", "1.5"], b"", 2,
     "top_p must be in (0, 1]"),
    ("eval: --top-k -1 (greedy by default)", {"d.jsonl": b'{"question": "q", "answer": "1"}\n'},
     ["eval", "CK", "--data", "d.jsonl", "--top-k", "-1"], b"", 2, "top_k"),
    ("sample: --min-p 1", {}, ["sample", "CK", "hi", "--min-p", "1"], b"", 2, "min_p must be in [0, 1)"),
    ("sample: --temperature nan", {}, ["sample", "CK", "hi", "--temperature", "nan"], b"", 2, "temperature"),
    ("score: a NaN log-prob", {"r.jsonl": GROUP + _record(1, 0, "NaN") + _record(1, 1)},
     ["score", "r.jsonl", "-o", "out.jsonl"], b"", 2, "r.jsonl:3: field 'logprobs' must be a list of finite"),
    ("score: an infinite log-prob on stdin", {}, ["score", "-", "-o", "out.jsonl"],
     _record(0, 0, "-Infinity") + _record(0, 1), 2, "<stdin>:1: field 'logprobs' must be a list of finite"),
    ("score: a reward weight of 1e308", {"r.jsonl": GROUP}, ["score", "r.jsonl", "--reward", "correct=1e308"],
     b"", 2, "magnitude <= 1e+09"),
    ("score: a reward module that calls sys.exit at import", {"r.jsonl": GROUP, "quits.py": b"raise SystemExit(3)\n"},
     ["score", "r.jsonl", "--reward-fn", "quits:fn", "-o", "out.jsonl"], b"", 2, "importing 'quits' raised SystemExit: 3"),
    ("score: a reward module that fails at import", {"r.jsonl": GROUP, "bad.py": b"x = 1 / 0\n"},
     ["score", "r.jsonl", "--reward-fn", "bad:fn", "-o", "out.jsonl"], b"", 2, "raised ZeroDivisionError"),
    ("score: a directory for the records", {"d/x": b""}, ["score", "d", "-o", "out.jsonl"], b"", 2,
     "d: is a directory (expected rollout records"),
    ("sample: a directory for the prompts", {"d/x": b""}, ["sample", "CK", "--prompts", "d"], b"", 2,
     "--prompts d: is a directory"),
    ("grpo: a config file with a string for a number", {"c.toml": b'temperature = "hot"\n'},
     ["grpo", "--config", "c.toml", "--out", "run"], b"", 2, "c.toml: setting 'temperature' must be a number, got 'hot'"),
    ("grpo: a config file with true for a count", {"c.yaml": b"steps: true\n"},
     ["grpo", "--config", "c.yaml", "--out", "run"], b"", 2, "c.yaml: setting 'steps' must be an integer"),
    ("grpo: a config file with a number for the reward functions", {"c.toml": b"reward_fn = [3]\n"},
     ["grpo", "--config", "c.toml", "--out", "run"], b"", 2, "setting 'reward_fn' must be a list of strings"),
    ("train: NaN in a scored record's rewards", {"r.jsonl": GROUP.replace(b'"policy": "p"}',
     b'"policy": "p", "rewards": {"x": NaN}, "reward": 0.0, "advantage": 0.5, "reward_errors": {}}')},
     ["train", "CK", "r.jsonl", "-o", "out"], b"", 2, "r.jsonl:1: field 'rewards' must be an object of name -> finite"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(case, ckpt, tmp_path):
    _, files, args, stdin, code, names = case
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    before = snapshot(tmp_path)
    result = run([str(ckpt) if a == "CK" else a for a in args], tmp_path, stdin)
    err = result.stderr.decode()
    assert result.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing written, nothing changed
