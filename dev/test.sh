#!/usr/bin/env bash
# Run the test suite in .venv (created and filled on first use). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q "$@"
