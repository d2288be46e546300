#!/usr/bin/env bash
# The one prepared GPU check (issue 7): the parity tests on the GPU, then the speed table of
# scripts/gpu_bench.py. Installs nothing: the lent H200 has jax, flax, optax, orbax, transformers, torch,
# typer, rich and pytest. Under 8 minutes on one H200. Through the device tool:
#     run(command="bash scripts/gpu_check.sh", timeout_s=540)
# Logs go to $OUT (the device tool's result folder) when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="lib:.:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
# Parity on the GPU: decoder vs HF, cached decode vs full forward, greedy vs HF generate, the loss and
# trainer behaviour, and cuDNN attention vs ours. (The 8-device sharding tests need the CPU's fake
# devices and are left out.)
timeout 240 python3 -m pytest -q -x -p no:cacheprovider -m "not slow" \
    tests/models tests/test_sampler.py tests/test_loss.py tests/test_trainer.py -k "not sharded" \
    2>&1 | tee "$LOGS/pytest.log" | tail -n 20
tests=${PIPESTATUS[0]}
timeout 280 python3 scripts/gpu_bench.py 2>&1 | tee "$LOGS/bench.log" | tail -n 20
bench=${PIPESTATUS[0]}
echo "pytest exit $tests, bench exit $bench"
exit $(( tests || bench ))
