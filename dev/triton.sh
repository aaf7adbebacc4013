#!/usr/bin/env bash
# Install NVIDIA Triton Inference Server for `perfusion serve` into .triton/ (or $PERFUSION_TRITON_HOME), beside
# the project venv and without touching it: the nvidia-pytriton wheel (a real tritonserver with its Python
# backend and bundled libraries) unpacked without its dependencies (its Python API pins numpy<2), and a
# numpy<2 of its own for the Python-backend stub. Fast when already installed. Needs .venv (dev/venv.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRITON_HOME="${PERFUSION_TRITON_HOME:-$ROOT/.triton}"
PY="$ROOT/.venv/bin/python"
WANT="nvidia-pytriton==0.7.0 numpy==1.26.4"
if [ "$(cat "$TRITON_HOME/.installed" 2>/dev/null)" != "$WANT" ]; then
  rm -rf "$TRITON_HOME"
  mkdir -p "$TRITON_HOME"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$TRITON_HOME/server" nvidia-pytriton==0.7.0
  "$PY" -m pip install -q --disable-pip-version-check --no-warn-conflicts --target "$TRITON_HOME/numpy1" numpy==1.26.4
  echo "$WANT" > "$TRITON_HOME/.installed"
fi
echo "Triton Inference Server ready in $TRITON_HOME"
