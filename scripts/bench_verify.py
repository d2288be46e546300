"""What verifying the checksums costs when a checkpoint is loaded (issue: checksummed checkpoints).

Each measurement is a fresh process (as every command is) that times `load_checkpoint` alone, with
verification on (the default: restore, compile and run the checksum program, compare) and off
(MLLMJAX_NO_VERIFY=1), alternating, --repeats times each; the table shows the medians.
--compile-cache loads the checksum program from a persistent cache after the first run, as commands
do by default.

    python scripts/bench_verify.py --ckpt CK                        # an existing checkpoint (SmolLM2)
    python scripts/bench_verify.py --shape qwen2.5-1.5b --work DIR  # writes a random 1.5B-shaped one
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SHAPES = {  # HF configs of the shapes the issue asks about (random weights: only the sizes matter)
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    },
}  # fmt: skip

CHILD = """
import json, sys, time
t0 = time.perf_counter()
if sys.argv[3] == "1":  # as a command does: compiled programs from the persistent cache after a first run
    from mllmjax.runtime import enable_compile_cache
    enable_compile_cache({"MLLMJAX_COMPILE_CACHE": "1", "MLLMJAX_CACHE": sys.argv[4]})
from mllmjax.checkpoint import load_checkpoint
import jax
t1 = time.perf_counter()
params = load_checkpoint(sys.argv[1], dtype=sys.argv[2] if sys.argv[2] != "-" else None).params
jax.block_until_ready(params)
print(json.dumps({"load_s": time.perf_counter() - t1}))
"""


def write_random(shape: str, work: Path, dtype: str) -> Path:
    import jax

    from mllmjax.checkpoint import DTYPES, write_checkpoint
    from mllmjax.models.registry import from_hf_config
    from mllmjax.models.transformer import init_params

    out = work / f"{shape}-{dtype}"
    if out.exists():
        return out
    hf = SHAPES[shape]
    params = init_params(from_hf_config(hf), jax.random.key(0), DTYPES[dtype])
    write_checkpoint(out, params=params, hf_config=hf, write_tokenizer=lambda d: None, source=f"random:{shape}")
    del params
    return out


def measure(ckpt: Path, verify: bool, dtype: str | None, cache: Path | None) -> float:
    env = dict(os.environ)
    env["MLLMJAX_NO_VERIFY"] = "0" if verify else "1"
    args = [str(ckpt), dtype or "-", "1" if cache else "0", str(cache)]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])["load_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="an existing checkpoint (written with checksums)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="write a random checkpoint of this shape")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mllmjax-bench-verify"))
    ap.add_argument("--dtype", default="float32", help="dtype of the random checkpoint")
    ap.add_argument("--load-dtype", default=None, help="restore in this dtype (verification then casts)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile-cache", action="store_true",
                    help="use a persistent compilation cache (in --work), as commands do by default")  # fmt: skip
    args = ap.parse_args()
    if (args.ckpt is None) == (args.shape is None):
        ap.error("give --ckpt or --shape")
    ckpt = args.ckpt or write_random(args.shape, args.work, args.dtype)
    meta = json.loads((ckpt / "mllmjax.json").read_text())
    if "checksums" not in meta:
        sys.exit(f"{ckpt} has no checksums (written before they existed): convert it again")
    size = sum(f.stat().st_size for f in (ckpt / "params").rglob("*") if f.is_file())
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for verify in (False, True):
            cache = args.work / "xla-cache" if args.compile_cache else None
            times[verify].append(measure(ckpt, verify, args.load_dtype, cache))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"checkpoint {ckpt} ({meta['num_params'] / 1e6:.0f}M params, {meta['dtype']}, {size / 2**20:.0f} MiB)"
          f"{', loaded as ' + args.load_dtype if args.load_dtype else ''}"
          f"{', compile cache on' if args.compile_cache else ''}")  # fmt: skip
    print(f"{'load, no verification':<28}{off:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times[False])})")
    print(f"{'load + verification':<28}{on:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times[True])})")
    print(f"{'cost of verification':<28}{on - off:8.2f} s   ({100 * (on - off) / off:+.0f}%)")


if __name__ == "__main__":
    main()
