"""Peak resident memory of `mllmjax convert` against the converted parameter bytes.

Runs each conversion in a fresh child process and reports: the RSS after importing everything
(baseline), the peak RSS, and (peak - baseline) / parameter bytes. Sources: the embedded SmolLM2-135M
GGUF and a random ~1.2 GB float32 Qwen2 saved with transformers (built here, in another process).

    python scripts/measure_convert_rss.py [--skip-qwen]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import jax, transformers, gguf  # imported up front so the baseline counts them
from mllmjax.convert import convert

def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

base = rss_mib()
t = time.perf_counter()
r = convert(sys.argv[1], sys.argv[2], dtype="float32")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"baseline_mib": base, "peak_mib": peak, "param_mib": r.param_bytes / 2**20,
                  "seconds": time.perf_counter() - t, "params": r.num_params}))
"""

MAKE_QWEN = r"""
import sys, torch, transformers
cfg = transformers.Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
torch.manual_seed(0)
model = transformers.Qwen2ForCausalLM(cfg).float()
model.save_pretrained(sys.argv[1])
sys.path.insert(0, "tests")
from hf_models import make_tokenizer
make_tokenizer(32000).save_pretrained(sys.argv[1])
"""


def measure(source: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, source, str(out)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-qwen", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        runs = [("smollm2-135m (GGUF Q4_1 -> f32)", "smollm2-135m")]
        if not args.skip_qwen:
            subprocess.run(
                [sys.executable, "-c", MAKE_QWEN, str(tmp_path / "qwen2")], check=True, capture_output=True
            )
            runs.append(("random Qwen2 ~1.2 GB (safetensors f32)", str(tmp_path / "qwen2")))
        print(
            f"{'source':42} {'params MiB':>10} {'baseline':>9} {'peak':>8} {'(peak-base)/params':>19} {'time':>7}"
        )
        for i, (label, source) in enumerate(runs):
            m = measure(source, tmp_path / f"ckpt{i}")
            ratio = (m["peak_mib"] - m["baseline_mib"]) / m["param_mib"]
            print(
                f"{label:42} {m['param_mib']:10.0f} {m['baseline_mib']:9.0f} {m['peak_mib']:8.0f} {ratio:19.2f} {m['seconds']:6.1f}s"
            )


if __name__ == "__main__":
    main()
