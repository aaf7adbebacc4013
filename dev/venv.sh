#!/usr/bin/env bash
# Create (or update) the project virtualenv at .venv and install everything the demo and tests need.
# Sourced by dev/demo.sh and dev/test.sh. Fast when nothing changed (a stamp keyed on the pins).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
STAMP="$VENV/.perfusion-deps"
WANT="$(cat "$ROOT/dev/requirements.txt" "$ROOT/dev/requirements-nodeps.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first and alone: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$(grep '^torch==' "$ROOT/dev/requirements.txt")"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/dev/requirements.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$ROOT/dev/requirements-nodeps.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
