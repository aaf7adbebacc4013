#!/usr/bin/env bash
# Run the test suite in .venv (created and filled on first use). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/venv.sh"
cd "$ROOT"
bash "$ROOT/dev/triton.sh" || echo "dev/triton.sh failed: the Triton serving tests will be skipped" >&2
exec "$VENV/bin/python" -m pytest -q "$@"
