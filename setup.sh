#!/usr/bin/env bash
# One-command setup: a virtual environment (.venv) with the project, its test tools and the right torch:
# a CPU build on a machine without an NVIDIA GPU (no multi-GB CUDA download), a CUDA build with one.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" "torch>=2.4"
  else
    # a local CPU wheel where the machine has one, else PyTorch's own CPU-only index
    "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null \
      || "${PIP[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${PIP[@]}" -e ".[dev]"
# The embedded presets, built once like a base-model download (tiny-sft: ~2.5 min of SFT on a 2-core CPU);
# jobs that need one also build it on first use.
.venv/bin/python cli.py presets
echo "setup done: activate with 'source .venv/bin/activate'"
