#!/usr/bin/env bash
# The demo: train a concept on the embedded toy model, generate with <perfusion:...>, export ONNX.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m perfusion_ext.cli.demo "$@"
