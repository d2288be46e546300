"""Hostile input across the commands: each case must exit with its documented code and one `error:` line
(no traceback), and leave no output or temporary file behind.

A table of cases, each run as a user would (the console script in a subprocess, stdin and files as given).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hf_models import save_hf_model
from xla_flags import xla_flags

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
def models(tmp_path_factory) -> Path:
    """A folder with `hf` (a tiny HF Llama) and `ck` (its conversion), shared by the cases (read only)."""
    folder = tmp_path_factory.mktemp("hostile")
    save_hf_model("llama-tied", folder / "hf", seed=1)
    convert(str(folder / "hf"), folder / "ck")
    return folder


@pytest.fixture(scope="module")
def ckpt(models) -> Path:
    return models / "ck"


def run(args: list[str], cwd: Path, stdin: bytes = b"", env: dict[str, str] | None = None, stdout: int | None = None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), str(ROOT)]), "XLA_FLAGS": xla_flags(),
           "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": str(cwd / "tmp"), **(env or {})}  # fmt: skip
    cmd = [sys.executable, "-m", "mllmjax_cli.main", *args]
    out = subprocess.PIPE if stdout is None else stdout
    return subprocess.run(cmd, cwd=cwd, env=env, input=stdin, stdout=out, stderr=subprocess.PIPE, timeout=300)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def copy_ckpt(models: Path, tmp: Path) -> Path:
    shutil.copytree(models / "ck", tmp / "ck")
    return tmp / "ck"


def largest_params_file(ck: Path) -> Path:
    return max((ck / "params").rglob("d/*"), key=lambda f: (f.stat().st_size, f.name))


def overwrite_middle(models: Path, tmp: Path) -> None:
    """Bytes overwritten inside the largest data file of the parameters (a damaged disk or copy)."""
    f = largest_params_file(copy_ckpt(models, tmp))
    with f.open("r+b") as h:
        h.seek(f.stat().st_size // 2)
        h.write(b"\x55" * 64)


def truncate_params(models: Path, tmp: Path) -> None:
    f = largest_params_file(copy_ckpt(models, tmp))
    os.truncate(f, 1000)


def remove_params_file(models: Path, tmp: Path) -> None:
    largest_params_file(copy_ckpt(models, tmp)).unlink()


def remove(name: str) -> Callable[[Path, Path], None]:
    def prep(models: Path, tmp: Path) -> None:
        target = copy_ckpt(models, tmp) / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return prep


def replace_file(name: str, data: bytes) -> Callable[[Path, Path], None]:
    def prep(models: Path, tmp: Path) -> None:
        (copy_ckpt(models, tmp) / name).write_bytes(data)

    return prep


def copy_hf(models: Path, tmp: Path) -> None:
    shutil.copytree(models / "hf", tmp / "hf")


def hf_with(name: str, data: bytes | None) -> Callable[[Path, Path], None]:
    def prep(models: Path, tmp: Path) -> None:
        copy_hf(models, tmp)
        if data is None:
            (tmp / "hf" / name).unlink()
        else:
            (tmp / "hf" / name).write_bytes(data)

    return prep


def truncated_safetensors(models: Path, tmp: Path) -> None:
    copy_hf(models, tmp)
    f = tmp / "hf" / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)


def existing_checkpoint(models: Path, tmp: Path) -> None:
    copy_ckpt(models, tmp)


@dataclasses.dataclass(frozen=True)
class Case:
    """A command line that must fail with `code` and one stderr line containing `text` (`error: ...`
    unless the case is a signal, which prints `interrupted` or `terminated`), leaving the folder as it
    was. CK in args is the shared checkpoint; `prep(models, tmp)` builds damaged copies (tmp/ck, tmp/hf)
    before the snapshot; `env` adds variables (MLLMJAX_SIGNAL_AT for the signal cases)."""

    name: str
    args: list[str]
    code: int
    text: str
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    stdin: bytes = b""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    prep: Callable[[Path, Path], None] | None = None
    closed_stdout: bool = False


# (name, files to write {name: bytes}, args (CK = the checkpoint), stdin, exit code, text the error names)
TABLE = [
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


DATA = {"d.jsonl": b'{"question": "What is 2+2?", "answer": "4"}\n{"question": "1+1?", "answer": "2"}\n'}
# Scored records the tiny checkpoint can train on (its tokenizer encodes "w1 w2" as [4, 5]).
SCORED = GROUP.replace(b'"policy": "p"}', b'"policy": "p", "rewards": {"x": 1.0}, "reward": 1.0, "advantage": 0.5, '
                       b'"reward_errors": {}}').replace(b'"prompt": "q", "prompt_ids": [1]',
                                                    b'"prompt": "w1 w2", "prompt_ids": [4, 5]')  # fmt: skip
UNWRITABLE = "/proc/mllmjax-out"  # not creatable even by root (the tests may run as root)
ROLLOUT = ["rollout", "CK", "--data", "d.jsonl", "-G", "2", "--max-new-tokens", "4"]


def signal_at(point: str, sig: str = "INT", hold: str = "60") -> dict[str, str]:
    return {"MLLMJAX_SIGNAL_AT": f"{point}:{sig}:{hold}"}


INTERRUPTED, TERMINATED = "interrupted", "terminated"

CASES = [Case(name, args, code, text, files, stdin) for name, files, args, stdin, code, text in TABLE] + [
    # Damaged, truncated and missing checkpoint files (tmp/ck is a copy; CK the shared one).
    Case("sample: bytes overwritten inside a params file", ["sample", "ck", "hi"], 2, "does not match its checksum",
         prep=overwrite_middle),
    Case("rollout: bytes overwritten inside a params file", ["rollout", "ck", "--data", "d.jsonl", "-o", "o.jsonl"],
         2, "does not match its checksum", files=DATA, prep=overwrite_middle),
    Case("export: bytes overwritten inside a params file", ["export", "ck", "-o", "hf_out"], 2,
         "does not match its checksum", prep=overwrite_middle),
    Case("train: bytes overwritten inside a params file", ["train", "ck", "r.jsonl", "-o", "out"], 2,
         "does not match its checksum", files={"r.jsonl": SCORED}, prep=overwrite_middle),
    Case("sample: a params file truncated", ["sample", "ck", "hi"], 2, "cannot restore the parameters: Error reading",
         prep=truncate_params),
    Case("eval: a params file missing", ["eval", "ck", "--data", "d.jsonl"], 2, "cannot restore the parameters",
         files=DATA, prep=remove_params_file),
    Case("sample: no params directory", ["sample", "ck", "hi"], 2, "no params/ directory", prep=remove("params")),
    Case("sample: no mllmjax.json", ["sample", "ck", "hi"], 2, "is not an mllmjax checkpoint",
         prep=remove("mllmjax.json")),
    Case("export: mllmjax.json not JSON", ["export", "ck", "-o", "x"], 2, "unreadable checkpoint metadata",
         prep=replace_file("mllmjax.json", b"{not json")),
    Case("sample: mllmjax.json of another format", ["sample", "ck", "hi"], 2, "format 'other/9'",
         prep=replace_file("mllmjax.json", b'{"format": "other/9"}')),
    Case("sample: no config.json", ["sample", "ck", "hi"], 2, "missing or unreadable config.json",
         prep=remove("config.json")),
    Case("sample: a tokenizer that is not JSON", ["sample", "ck", "hi"], 2, "cannot load the tokenizer",
         prep=replace_file("tokenizer.json", b"\x00\x01garbage")),
    Case("train: a checkpoint that is a file", ["train", "f", "r.jsonl", "-o", "out"], 2,
         "f is not an mllmjax checkpoint", files={"f": b"x", "r.jsonl": SCORED}),
    # Sources that convert cannot use.
    Case("convert: a missing source folder", ["convert", "./nope", "-o", "out"], 2, "nope"),
    Case("convert: a .gguf file of garbage", ["convert", "m.gguf", "-o", "out"], 2, "m.gguf",
         files={"m.gguf": b"GGUF\x03\x00\x00\x00garbage"}),
    Case("convert: a truncated safetensors file", ["convert", "hf", "-o", "out"], 2, "model.safetensors",
         prep=truncated_safetensors),
    Case("convert: config.json not JSON", ["convert", "hf", "-o", "out"], 2, "config.json",
         prep=hf_with("config.json", b"{oops")),
    Case("convert: an architecture we do not implement", ["convert", "hf", "-o", "out"], 2, "NotAModel",
         prep=hf_with("config.json", b'{"architectures": ["NotAModel"], "model_type": "notamodel"}')),
    Case("convert: the output exists", ["convert", "hf", "-o", "ck"], 2, "ck exists; pass --force",
         prep=lambda m, t: (copy_hf(m, t), copy_ckpt(m, t))),
    # Malformed, mixed and oversized records.
    Case("score: a record that is a JSON array", ["score", "r.jsonl", "-o", "o.jsonl"], 2, "r.jsonl:1:",
         files={"r.jsonl": b"[1, 2, 3]\n"}),
    Case("score: a torn last line", ["score", "r.jsonl", "-o", "o.jsonl"], 2, "r.jsonl:3:",
         files={"r.jsonl": GROUP + _record(1, 0)[:40]}),
    Case("score: an eval record among rollouts", ["score", "r.jsonl", "-o", "o.jsonl"], 2, "r.jsonl:2:",
         files={"r.jsonl": _record(0, 0) + b'{"schema": "mllmjax.eval/1", "x": 1}\n'}),
    Case("score: a record without its completion", ["score", "-", "-o", "o.jsonl"], 2, "<stdin>:1:",
         stdin=_record(0, 0).replace(b'"completion": "<answer>4</answer>", ', b"")),
    Case("score: a group number that is a string", ["score", "r.jsonl"], 2, "r.jsonl:1:",
         files={"r.jsonl": _record(0, 0).replace(b'"group": 0', b'"group": "zero"')}),
    Case("score: an empty file", ["score", "r.jsonl", "-o", "o.jsonl"], 2, "r.jsonl", files={"r.jsonl": b""}),
    Case("train: unscored records", ["train", "CK", "r.jsonl", "-o", "out"], 2, "run 'mllmjax score'",
         files={"r.jsonl": GROUP}),
    Case("train: token ids outside the vocabulary", ["train", "CK", "r.jsonl", "-o", "out"], 2, "vocabulary",
         files={"r.jsonl": SCORED.replace(b'"completion_ids": [5, 6]', b'"completion_ids": [5, 999999]')}),
    Case("train: an oversized record (past the model's context)", ["train", "CK", "r.jsonl", "-o", "out"], 2,
         "context", files={"r.jsonl": SCORED.replace(b'"completion_ids": [5, 6]', b'"completion_ids": ['
                           + b", ".join([b"5"] * 5000) + b"]").replace(b'"logprobs": [-0.1, -0.5]', b'"logprobs": ['
                           + b", ".join([b"-0.1"] * 5000) + b"]")}),
    # Out-of-range and non-finite flag values.
    Case("sample: --max-new-tokens 0", ["sample", "CK", "hi", "--max-new-tokens", "0"], 2, "max_new_tokens"),
    Case("sample: --temperature inf", ["sample", "CK", "hi", "--temperature", "inf"], 2, "temperature"),
    Case("sample: --top-p 0", ["sample", "CK", "hi", "--top-p", "0"], 2, "top_p must be in (0, 1]"),
    Case("sample: -n 0", ["sample", "CK", "hi", "-n", "0"], 2, "n"),
    Case("sample: a mesh larger than the devices", ["sample", "CK", "hi", "--mesh", "data=3"], 2, "data=3"),
    Case("sample: --dtype float8", ["sample", "CK", "hi", "--dtype", "float8"], 2, "float8"),
    Case("rollout: -G 0", [*ROLLOUT[:5], "0", "-o", "o.jsonl"], 2, "group", files=DATA),
    Case("score: --reward-timeout -1", ["score", "r.jsonl", "--reward-timeout", "-1"], 2, "reward", files={"r.jsonl": GROUP}),
    Case("score: a reward that does not exist", ["score", "r.jsonl", "--reward", "nosuch"], 2, "nosuch",
         files={"r.jsonl": GROUP}),
    Case("train: --lr nan", ["train", "CK", "r.jsonl", "-o", "out", "--lr", "nan"], 2, "learning rate", files={"r.jsonl": SCORED}),
    Case("grpo: --steps -1", ["grpo", "--steps", "-1", "--out", "run"], 2, "steps"),
    Case("train: a sequence ratio with token-level TIS", ["train", "CK", "r.jsonl", "-o", "out", "--ratio-level",
         "sequence", "--tis-cap", "2"], 2, "--tis-cap", files={"r.jsonl": SCORED}),
    Case("train: CISPO with a sequence ratio", ["train", "CK", "r.jsonl", "-o", "out", "--loss", "cispo",
         "--ratio-level", "sequence"], 2, "cispo", files={"r.jsonl": SCORED}),
    Case("train: --entropy-coef nan", ["train", "CK", "r.jsonl", "-o", "out", "--entropy-coef", "nan"], 2,
         "entropy_coef", files={"r.jsonl": SCORED}),
    Case("grpo: the gspo recipe with --tis-cap", ["grpo", "--config", "gspo", "--tis-cap", "2", "--out", "run"], 2,
         "sequence-level ratio"),
    Case("grpo: a soft overlong penalty that never applies", ["grpo", "--overlong", "soft:400,100", "--out", "run"],
         2, "never applies"),
    Case("grpo: REINFORCE++ with dynamic sampling", ["grpo", "--advantage", "reinforce_pp", "--out", "run"], 2,
         "per-group"),
    Case("grpo: an estimator switch with a batch-wide estimator", ["grpo", "--estimator-switch", "entropy<0.2",
         "--advantage", "reinforce", "--no-dynamic-sampling", "--out", "run"], 2, "per-group"),
    Case("grpo: an estimator switch on another metric", ["grpo", "--estimator-switch", "kl<0.2", "--out", "run"], 2,
         "entropy<T"),
    Case("grpo: --replay-prob 1.5", ["grpo", "--replay-prob", "1.5", "--out", "run"], 2, "probability"),
    Case("score: a soft overlong penalty without L_MAX", ["score", "r.jsonl", "--overlong", "soft:26"], 2,
         "soft:L_MAX,L_CACHE", files={"r.jsonl": GROUP}),
    Case("rollout: a hub dataset with no network", ["rollout", "CK", "--data", "nosuch/dataset", "-o", "o.jsonl"], 2,
         "cannot be reached and it is not in the local cache",
         env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": "hf_home"}),
    # Output locations that cannot be written, or that would be replaced without --force.
    Case("score: an output on a read-only mount", ["score", "r.jsonl", "-o", f"{UNWRITABLE}.jsonl"], 2, "cannot write",
         files={"r.jsonl": GROUP}),
    Case("sample: an output on a read-only mount", ["sample", "CK", "hi", "-o", f"{UNWRITABLE}.txt"], 2,
         "cannot write"),
    Case("convert: an output on a read-only mount", ["convert", "CK", "-o", UNWRITABLE], 2, "cannot write"),
    Case("export: an output on a read-only mount", ["export", "CK", "-o", UNWRITABLE], 2, "cannot write"),
    Case("score: an output under a file", ["score", "r.jsonl", "-o", "r.jsonl/o.jsonl"], 2, "is not a directory",
         files={"r.jsonl": GROUP}),
    Case("rollout: an output that is a directory", [*ROLLOUT, "-o", "sub", "--force"], 2, "sub is a directory",
         files={**DATA, "sub/keep": b"x"}),
    Case("train: an existing output without --force", ["train", "CK", "r.jsonl", "-o", "ck"], 2,
         "ck exists; pass --force", files={"r.jsonl": SCORED}, prep=existing_checkpoint),
    # A closed stdout: a quiet stop, exit 1 (nothing on stderr: the reader went away on purpose).
    Case("score: stdout closed", ["score", "r.jsonl", "-o", "-"], 1, "", files={"r.jsonl": GROUP},
         closed_stdout=True),
    Case("sample: stdout closed", ["sample", "CK", "a", "b", "--max-new-tokens", "2"], 1, "", closed_stdout=True),
    # Signals at several points: exit 130 / 143 at once, no temp file left, an existing output unchanged.
    Case("sample: Ctrl-C after loading", ["sample", "CK", "hi", "--json", "-o", "o.jsonl"], 130, INTERRUPTED,
         env=signal_at("loaded")),
    Case("sample: SIGTERM inside a compiled call", ["sample", "CK", "hi", "--json", "-o", "o.jsonl"], 143,
         TERMINATED, env=signal_at("sampling", "TERM", "xla")),
    Case("sample: Ctrl-C with the output in its temp file", ["sample", "CK", "hi", "-o", "o.txt", "--force"], 130,
         INTERRUPTED, files={"o.txt": b"mine"}, env=signal_at("write")),
    Case("rollout: Ctrl-C while sampling", [*ROLLOUT, "-o", "o.jsonl"], 130, INTERRUPTED, files=DATA,
         env=signal_at("sampling", "INT", "xla")),
    Case("rollout: SIGTERM with the records in their temp file", [*ROLLOUT, "-o", "new/o.jsonl"], 143, TERMINATED,
         files=DATA, env=signal_at("write", "TERM")),
    Case("eval: Ctrl-C while sampling", ["eval", "CK", "--data", "d.jsonl", "-o", "o.jsonl"], 130, INTERRUPTED,
         files=DATA, env=signal_at("sampling")),
    Case("score: Ctrl-C with the records in their temp file", ["score", "r.jsonl", "-o", "o.jsonl"], 130,
         INTERRUPTED, files={"r.jsonl": GROUP}, env=signal_at("write")),
    Case("train: Ctrl-C before the update", ["train", "CK", "r.jsonl", "-o", "out"], 130, INTERRUPTED,
         files={"r.jsonl": SCORED}, env=signal_at("update", "INT", "xla")),
    Case("train: SIGTERM with the checkpoint in its temp dir", ["train", "CK", "r.jsonl", "-o", "ck", "--force"],
         143, TERMINATED, files={"r.jsonl": SCORED}, prep=existing_checkpoint, env=signal_at("rename", "TERM")),
    Case("convert: Ctrl-C with the checkpoint in its temp dir", ["convert", "hf", "-o", "a/b/out"], 130, INTERRUPTED,
         prep=copy_hf, env=signal_at("rename")),
    Case("export: SIGTERM with the export in its temp dir", ["export", "CK", "-o", "hf_out"], 143, TERMINATED,
         env=signal_at("rename", "TERM")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case, models, tmp_path):
    (tmp_path / "tmp").mkdir()  # TMPDIR: temp files made outside the output's folder are seen too
    for name, data in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    if case.prep is not None:
        case.prep(models, tmp_path)
    before = snapshot(tmp_path)
    args = [str(models / "ck") if a == "CK" else a for a in case.args]
    if case.closed_stdout:
        read_end, write_end = os.pipe()
        os.close(read_end)  # any write to stdout fails with EPIPE
        try:
            result = run(args, tmp_path, case.stdin, case.env, stdout=write_end)
        finally:
            os.close(write_end)
    else:
        result = run(args, tmp_path, case.stdin, case.env)
    err = result.stderr.decode()
    assert result.returncode == case.code, err
    # Informational lines may come first (train's memory estimate); the last line says what happened.
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    if case.text in (INTERRUPTED, TERMINATED):
        assert lines[-1] == case.text and not errors, err
    elif case.closed_stdout:
        assert lines == [], err
    else:
        assert errors == [lines[-1]] and lines[-1].startswith("error: ") and case.text in lines[-1], err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing written, nothing changed, no temp file left


def test_at_least_sixty_cases():
    assert len(CASES) >= 60


def test_grpo_a_third_signal_exits_at_once(models, tmp_path):
    """grpo stops gracefully on the first signal and abandons the step on the second, both in the main
    thread; a third ends the process at once even inside a compiled call, without temp dirs."""
    (tmp_path / "tmp").mkdir()
    args = ["grpo", "--model", str(models / "ck"), "--data", "builtin:sums", "--steps", "2", "--prompts-per-step", "1",
            "-G", "2", "--max-new-tokens", "4", "--eval-every", "0", "-o", "run"]  # fmt: skip
    result = run(args, tmp_path, env=signal_at("update", "INTx3", "xla"))
    err = result.stderr.decode()
    assert result.returncode == 130, err
    assert err.strip().splitlines()[-1] == INTERRUPTED and "Traceback" not in err
    assert not [p for p in (tmp_path / "run").rglob(".*")], "temp files left"
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())
    assert not list((tmp_path / "tmp").iterdir())


def test_outputs_follow_the_umask_and_missing_folders_are_made(models, tmp_path):
    """Records and checkpoints get the modes of the umask (not mkstemp's 0600 / mkdtemp's 0700), and an
    output under folders that do not exist yet creates them, as `mkdir -p` would (the same rule for
    every command; an interrupted or failed command removes them again: the signal cases above)."""
    (tmp_path / "tmp").mkdir()
    (tmp_path / "r.jsonl").write_bytes(GROUP)
    old = os.umask(0o022)
    try:
        assert run(["score", "r.jsonl", "-o", "a/b/s.jsonl"], tmp_path).returncode == 0
        assert run(["export", str(models / "ck"), "-o", "c/hf"], tmp_path).returncode == 0
        assert run(["convert", str(models / "hf"), "-o", "d/ck"], tmp_path).returncode == 0
    finally:
        os.umask(old)
    assert (tmp_path / "a/b/s.jsonl").stat().st_mode & 0o777 == 0o644
    for folder in ("c/hf", "d/ck"):
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o755, folder
    assert (tmp_path / "d/ck/tokenizer.json").stat().st_mode & 0o777 == 0o644
    assert not list((tmp_path / "tmp").iterdir())
